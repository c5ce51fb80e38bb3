//! Script metadata (`/* rexxjs-vm-KEY: VALUE */` lines) from arbitrary text: `cloner::plan::parse_plan`.
//!
//! Properties: never a panic; an accepted plan satisfies every documented bound (a valid base
//! name, memory 16M–1T, 1–256 CPUs, ports 1–65535, timeout 1 s–7 d); a rejected one names at
//! least one problem, each with a line number inside the scanned lines (or 0 for the whole).
#![no_main]

use cloner::plan::{parse_plan, MAX_CPUS, MEMORY_RANGE, SCAN_LINES, TIMEOUT_RANGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let script = String::from_utf8_lossy(data);
    match parse_plan(&script) {
        Ok(plan) => {
            assert!(cloner::registry::validate_name(&plan.base).is_ok(), "{plan:?}");
            if let Some(memory) = plan.memory {
                assert!((MEMORY_RANGE.0..=MEMORY_RANGE.1).contains(&memory), "{plan:?}");
            }
            if let Some(cpus) = plan.cpus {
                assert!((1..=MAX_CPUS).contains(&cpus), "{plan:?}");
            }
            assert!(plan.ingress_port != Some(0), "{plan:?}");
            assert!(!plan.egress_ports.contains(&0), "{plan:?}");
            if let Some(timeout) = plan.timeout_secs {
                let range = TIMEOUT_RANGE.0.as_secs()..=TIMEOUT_RANGE.1.as_secs();
                assert!(range.contains(&timeout), "{plan:?}");
            }
        }
        Err(error) => {
            assert!(!error.problems.is_empty());
            assert!(error.problems.iter().all(|p| p.line <= SCAN_LINES), "{error:?}");
        }
    }
});
