//! The project's OCSF 1.3.0 / ECS 8.11 validator (`tests/siem/validate.py`), for every test that
//! writes alert records.

use std::path::Path;

/// Runs the validator on a JSON-lines file of alert records; fails with its report on any error
/// or warning. A missing or empty file passes (nothing was written).
pub fn assert_conform(alerts: &Path) {
    if std::fs::metadata(alerts).map_or(true, |metadata| metadata.len() == 0) {
        return;
    }
    let validator = concat!(env!("CARGO_MANIFEST_DIR"), "/../siem/validate.py");
    let output = std::process::Command::new("python3")
        .args([validator, "--strict", "--per-record"])
        .arg(alerts)
        .output()
        .expect("python3 runs the validator");
    assert!(
        output.status.success(),
        "{} does not conform:\n{}{}",
        alerts.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
