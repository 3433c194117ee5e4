//! Service identities: the numbers every packet's source and destination resolve to.

/// Nothing resolved (never stored in a map; reported when parsing stopped early).
pub const UNKNOWN: u32 = 0;
/// This machine's own addresses.
pub const HOST: u32 = 1;
/// Any address that no service, CIDR rule or host address claims.
pub const WORLD: u32 = 2;

/// Identities below this are reserved for the ones above and future use.
pub const FIRST_SERVICE: u32 = 256;
/// Service identities (declared or hashed from the name) live in `FIRST_SERVICE..SERVICE_END`.
pub const SERVICE_END: u32 = 1 << 24;
/// CIDR peers named in rules get identities in `SERVICE_END..CIDR_END`, hashed from the CIDR.
pub const CIDR_END: u32 = 1 << 25;

/// Bits of [`IdentityInfo::flags`].
pub mod flags {
    /// A declared service (or the host under `manage_host`): default-deny applies to it.
    pub const SERVICE: u32 = 1 << 0;
    /// The service runs in audit mode: what would be dropped is passed and reported.
    pub const AUDIT: u32 = 1 << 1;
    /// (ipcache only) The address of a service with an endpoint interface on this host: a
    /// packet from it must have come in through that service's endpoint interface.
    pub const LOCAL_ENDPOINT: u32 = 1 << 2;
}

/// What an address, endpoint interface or cgroup resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityInfo {
    pub identity: u32,
    pub flags: u32,
}

impl IdentityInfo {
    pub const WORLD: Self = Self {
        identity: WORLD,
        flags: 0,
    };

    #[inline(always)]
    pub const fn is_service(&self) -> bool {
        self.flags & flags::SERVICE != 0
    }

    #[inline(always)]
    pub const fn is_audit(&self) -> bool {
        self.flags & flags::AUDIT != 0
    }
}

/// Key of the endpoint-interface map: the host side of a veth whose namespace is one service's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub ifindex: u32,
    /// Policy slot (0 or 1) this entry belongs to.
    pub slot: u32,
}

/// Key of the cgroup map: a cgroup v2 directory's id (its inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub slot: u32,
    pub _pad: u32,
}

kernel_abi!(IdentityInfo = 8, EndpointKey = 8, CgroupKey = 16);
