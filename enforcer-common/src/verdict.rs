//! What the datapath decided about a packet, and why.

/// Verdict codes.
pub const ALLOW: u8 = 1;
pub const DENY: u8 = 2;
/// Would have been denied; passed because of audit mode.
pub const AUDIT: u8 = 3;
/// Number of verdict codes including the unused 0, for counter indexing.
pub const VERDICT_SLOTS: u32 = 4;

/// Reason codes.
pub mod reason {
    /// Allowed by an explicit rule (new flow).
    pub const POLICY_ALLOW: u8 = 1;
    /// Part of a flow conntrack already admitted under the current generation.
    pub const ESTABLISHED: u8 = 2;
    /// Neither side is a declared service.
    pub const DEFAULT_ALLOW: u8 = 3;
    /// An ICMP error about a tracked flow.
    pub const RELATED: u8 = 4;
    /// Neighbour discovery / MLD, which the link needs to work at all.
    pub const INFRASTRUCTURE: u8 = 5;
    /// Non-first fragment of a datagram whose first fragment was admitted.
    pub const FRAGMENT_FOLLOWS: u8 = 6;
    /// Denied by an explicit `[[deny]]` rule.
    pub const POLICY_DENY: u8 = 10;
    /// A declared service is involved and no rule allows it.
    pub const DEFAULT_DENY: u8 = 11;
    /// Source address is not one of the endpoint interface's service's addresses.
    pub const SPOOFED: u8 = 12;
    /// The sending cgroup's service and the source address's service disagree.
    pub const IDENTITY_MISMATCH: u8 = 13;
    /// Over the allow rule's `max_new_per_sec`.
    pub const RATE_LIMITED: u8 = 14;
    /// Truncated or malformed headers.
    pub const MALFORMED: u8 = 15;
    /// Fragment whose first fragment was not seen or not admitted, or which overlaps the
    /// transport header.
    pub const BAD_FRAGMENT: u8 = 16;
    /// No policy generation installed.
    pub const NO_POLICY: u8 = 17;
    /// More VLAN tags or IPv6 extension headers than the parser follows.
    pub const UNSUPPORTED_HEADERS: u8 = 18;
    /// A TCP segment other than a SYN, of no tracked connection: only a SYN opens one.
    pub const NO_CONNECTION: u8 = 19;
    /// An ICMP error quoting a tracked flow that is not addressed to the quoted packet's sender,
    /// or is larger than an error is (576 bytes over IPv4, 1280 over IPv6).
    pub const FORGED_ICMP_ERROR: u8 = 20;
    /// Number of reason codes including the unused 0, for counter indexing.
    pub const REASON_SLOTS: u32 = 21;
}

/// Index of `(verdict, reason)` in the per-CPU packet counter array.
#[inline(always)]
pub const fn packet_counter_index(verdict: u8, reason: u8) -> u32 {
    verdict as u32 * reason::REASON_SLOTS + reason as u32
}

/// Size of the per-CPU packet counter array.
pub const PACKET_COUNTER_SLOTS: u32 = VERDICT_SLOTS * reason::REASON_SLOTS;

#[cfg(feature = "user")]
mod user {
    use core::fmt;

    /// A verdict code as the controller reports it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Verdict {
        Allow,
        Deny,
        Audit,
    }

    impl Verdict {
        pub const ALL: [Self; 3] = [Self::Allow, Self::Deny, Self::Audit];

        pub fn from_code(code: u8) -> Option<Self> {
            match code {
                super::ALLOW => Some(Self::Allow),
                super::DENY => Some(Self::Deny),
                super::AUDIT => Some(Self::Audit),
                _ => None,
            }
        }

        pub const fn code(self) -> u8 {
            match self {
                Self::Allow => super::ALLOW,
                Self::Deny => super::DENY,
                Self::Audit => super::AUDIT,
            }
        }

        pub const fn as_str(self) -> &'static str {
            match self {
                Self::Allow => "allow",
                Self::Deny => "deny",
                Self::Audit => "audit",
            }
        }
    }

    impl fmt::Display for Verdict {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }

    /// Why the datapath decided as it did: a reason code as the controller reports it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Reason {
        PolicyAllow,
        Established,
        DefaultAllow,
        Related,
        Infrastructure,
        FragmentFollows,
        PolicyDeny,
        DefaultDeny,
        Spoofed,
        IdentityMismatch,
        RateLimited,
        Malformed,
        BadFragment,
        NoPolicy,
        UnsupportedHeaders,
        NoConnection,
        ForgedIcmpError,
    }

    impl Reason {
        pub const ALL: [Self; 17] = [
            Self::PolicyAllow,
            Self::Established,
            Self::DefaultAllow,
            Self::Related,
            Self::Infrastructure,
            Self::FragmentFollows,
            Self::PolicyDeny,
            Self::DefaultDeny,
            Self::Spoofed,
            Self::IdentityMismatch,
            Self::RateLimited,
            Self::Malformed,
            Self::BadFragment,
            Self::NoPolicy,
            Self::UnsupportedHeaders,
            Self::NoConnection,
            Self::ForgedIcmpError,
        ];

        pub const fn code(self) -> u8 {
            use super::reason::*;
            match self {
                Self::PolicyAllow => POLICY_ALLOW,
                Self::Established => ESTABLISHED,
                Self::DefaultAllow => DEFAULT_ALLOW,
                Self::Related => RELATED,
                Self::Infrastructure => INFRASTRUCTURE,
                Self::FragmentFollows => FRAGMENT_FOLLOWS,
                Self::PolicyDeny => POLICY_DENY,
                Self::DefaultDeny => DEFAULT_DENY,
                Self::Spoofed => SPOOFED,
                Self::IdentityMismatch => IDENTITY_MISMATCH,
                Self::RateLimited => RATE_LIMITED,
                Self::Malformed => MALFORMED,
                Self::BadFragment => BAD_FRAGMENT,
                Self::NoPolicy => NO_POLICY,
                Self::UnsupportedHeaders => UNSUPPORTED_HEADERS,
                Self::NoConnection => NO_CONNECTION,
                Self::ForgedIcmpError => FORGED_ICMP_ERROR,
            }
        }

        pub fn from_code(code: u8) -> Option<Self> {
            Self::ALL.into_iter().find(|reason| reason.code() == code)
        }

        /// Its name in metrics labels, events and alerts.
        pub const fn as_str(self) -> &'static str {
            match self {
                Self::PolicyAllow => "policy_allow",
                Self::Established => "established",
                Self::DefaultAllow => "default_allow",
                Self::Related => "related",
                Self::Infrastructure => "infrastructure",
                Self::FragmentFollows => "fragment",
                Self::PolicyDeny => "policy_deny",
                Self::DefaultDeny => "default_deny",
                Self::Spoofed => "spoofed",
                Self::IdentityMismatch => "identity_mismatch",
                Self::RateLimited => "rate_limited",
                Self::Malformed => "malformed",
                Self::BadFragment => "bad_fragment",
                Self::NoPolicy => "no_policy",
                Self::UnsupportedHeaders => "unsupported_headers",
                Self::NoConnection => "no_connection",
                Self::ForgedIcmpError => "forged_icmp_error",
            }
        }

        /// Whether the packet was dropped for its shape rather than by policy.
        pub const fn is_malformed(self) -> bool {
            matches!(
                self,
                Self::Malformed | Self::BadFragment | Self::UnsupportedHeaders
            )
        }

        /// Whether the packet claimed an identity that is not its own.
        pub const fn is_spoof(self) -> bool {
            matches!(self, Self::Spoofed | Self::IdentityMismatch)
        }
    }

    impl fmt::Display for Reason {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }

    /// The name of a reason code, `unknown` for a code this build does not know (packet
    /// counters of a datapath from another build).
    pub fn reason_name(code: u8) -> &'static str {
        Reason::from_code(code).map_or("unknown", Reason::as_str)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_reason_code_has_one_reason_and_fits_the_counters() {
            for reason in Reason::ALL {
                assert_eq!(Reason::from_code(reason.code()), Some(reason));
                assert!(u32::from(reason.code()) < super::super::reason::REASON_SLOTS);
            }
            let codes: std::collections::BTreeSet<u8> =
                Reason::ALL.iter().map(|reason| reason.code()).collect();
            assert_eq!(codes.len(), Reason::ALL.len());
            assert_eq!(Reason::from_code(0), None);
        }
    }
}

#[cfg(feature = "user")]
pub use user::*;
