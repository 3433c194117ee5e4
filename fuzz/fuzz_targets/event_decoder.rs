//! Ring buffer records as the kernel hands them over, any bytes: decoded, described and
//! encoded as alerts in both formats without a panic (a datapath of another build may send
//! codes this one does not know).
#![no_main]

use enforcer::{
    events::{self, Clock, Generations},
    outputs::alert::{AlertFormat, flow_alert},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some(event) = events::decode(bytes) else {
        return;
    };
    let Some(record) = events::describe(&event, &Generations::default(), &Clock::now(), |index| {
        format!("if{index}")
    }) else {
        return;
    };
    for format in [AlertFormat::Ocsf, AlertFormat::Ecs] {
        let alert = flow_alert(&record, format, "fuzz");
        serde_json::to_string(&alert).expect("an alert serializes");
    }
});
