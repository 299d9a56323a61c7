//! `lab-probe`: checks of the lab kernel's vhost devices for the lab's
//! smoke test. Prints `LAB-RESULT` lines (the lab's result format) and
//! exits non-zero if the probe failed.
//!
//! ```text
//! lab-probe vhost-net [PATH]          # default /dev/vhost-net
//! lab-probe vhost-vdpa PATH           # e.g. /dev/vhost-vdpa-0
//! ```

use std::path::Path;

use anyhow::{bail, Result};
use labnic::probe::probe;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, path, vdpa) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["vhost-net"] => ("vhost_net", "/dev/vhost-net", false),
        ["vhost-net", path] => ("vhost_net", path, false),
        ["vhost-vdpa", path] => ("vhost_vdpa", path, true),
        _ => bail!("usage: lab-probe vhost-net [PATH] | lab-probe vhost-vdpa PATH"),
    };
    match probe(Path::new(path), vdpa) {
        Ok(info) => {
            let mut line = format!(
                "LAB-RESULT {kind}_open=ok {kind}_set_owner=ok {kind}_features={:#x} {kind}_backend_features={:#x}",
                info.features, info.backend_features
            );
            if let Some(id) = info.device_id {
                line.push_str(&format!(" {kind}_device_id={id}"));
            }
            if let Some(num) = info.vring_num {
                line.push_str(&format!(" {kind}_vring_num={num}"));
            }
            if let Some(mac) = info.mac {
                let text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
                line.push_str(&format!(" {kind}_mac={}", text.join(":")));
            }
            println!("{line}");
            Ok(())
        }
        Err(e) => {
            println!("LAB-RESULT {kind}_probe=fail");
            Err(e.into())
        }
    }
}
