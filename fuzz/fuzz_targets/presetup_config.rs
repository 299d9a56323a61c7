//! The presetup `DeviceConfig` decoder and validation, as the control
//! API's `presetup` and `query-config` payloads reach them: arbitrary JSON
//! through `DeviceConfig::from_json` and `ValidConfig`. Nothing may panic;
//! a valid configuration survives a round trip through its JSON; and the
//! switchover plan between two configurations (the input split at its
//! first NUL byte) can always be made.

#![no_main]

use libfuzzer_sys::fuzz_target;
use presetup::{DeviceConfig, ValidConfig};

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(text) = std::str::from_utf8(first) else {
        return;
    };
    let decoded = DeviceConfig::from_json(text);
    let valid = ValidConfig::from_json(text);
    if let Ok(valid) = &valid {
        let again = ValidConfig::from_json(&valid.clone().into_inner().to_json())
            .expect("a valid configuration decodes from its own JSON");
        assert_eq!(&again, valid, "round trip");
        assert!(decoded.is_ok());
    }
    let Some(second) = second.and_then(|bytes| std::str::from_utf8(bytes).ok()) else {
        return;
    };
    if let (Ok(early), Ok(final_)) = (
        DeviceConfig::from_json(text),
        ValidConfig::from_json(second),
    ) {
        let _ = presetup::plan(&early, &final_);
        let _ = presetup::plan_full(&final_);
    }
});
