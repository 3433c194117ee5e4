//! Ring buffer records as the kernel hands them over, any bytes: decoded, described and
//! written as alert lines in both formats without a panic (a datapath of another build may
//! send codes this one does not know), each line one JSON object (the lines are written by
//! hand, see `outputs::json_line`).
#![no_main]

use enforcer::{
    events::{self, Clock, Generations},
    outputs::alert::{AlertFormat, write_flow_alert},
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
        let mut line = String::new();
        write_flow_alert(&mut line, &record, format, "fuzz");
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("an alert line is JSON");
        assert!(parsed.is_object(), "{line}");
    }
});
