//! Which agent device on the source becomes which on the destination.
//!
//! Given by id (`--device SRC[=DST]`), or found: a device of an agent
//! belongs to the VM when one of its QEMU's character devices
//! (`query-chardev`) is a unix socket at the device's vhost-user socket.
//! Source and destination QEMU run the same configuration, so the
//! character device's label (`-chardev id=`) pairs a source device with
//! its destination device.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use super::agents::AgentDevice;
use super::Side;

/// The device mapping cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// `--device` names a device the agent does not serve.
    #[error("the {side} agent serves no device {id:?} (it serves {served})")]
    NoSuchDevice {
        /// Which agent.
        side: Side,
        /// The id asked for.
        id: String,
        /// The ids it serves.
        served: String,
    },
    /// A pair joins a disk and a net device.
    #[error("source device {source_id} is {source_kind}, destination device {destination_id} is {destination_kind}")]
    KindMismatch {
        /// Source id.
        source_id: String,
        /// Its kind.
        source_kind: String,
        /// Destination id.
        destination_id: String,
        /// Its kind.
        destination_kind: String,
    },
    /// No character device of the source QEMU is a socket the source
    /// agent serves.
    #[error(
        "no character device of the source QEMU is served by the source agent \
         (QEMU's sockets: {chardevs}; the agent's: {sockets}); name the devices with --device"
    )]
    NothingServed {
        /// QEMU's unix socket paths.
        chardevs: String,
        /// The agent's sockets.
        sockets: String,
    },
    /// A source device's character device has no counterpart that the
    /// destination agent serves.
    #[error(
        "source device {device} (chardev {label}) has no counterpart: the destination QEMU's \
         chardev {label} is {found}"
    )]
    NoCounterpart {
        /// The source device.
        device: String,
        /// The chardev label.
        label: String,
        /// What the destination has under that label.
        found: String,
    },
    /// A device is named twice.
    #[error("device {0} is mapped twice")]
    Twice(String),
    /// `query-chardev` did not have the expected shape.
    #[error("query-chardev of the {side} QEMU: {what}")]
    BadChardevs {
        /// Which QEMU.
        side: Side,
        /// What is wrong.
        what: String,
    },
}

/// `--device SRC[=DST]`: the source agent's device `source` becomes the
/// destination agent's `destination` (the same id when `=DST` is left
/// out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePair {
    /// Id on the source agent.
    pub source: String,
    /// Id on the destination agent.
    pub destination: String,
}

impl FromStr for DevicePair {
    type Err = String;

    fn from_str(text: &str) -> Result<DevicePair, String> {
        let (source, destination) = text.split_once('=').unwrap_or((text, text));
        if source.is_empty() || destination.is_empty() {
            return Err(format!("{text:?} is not SRC or SRC=DST"));
        }
        Ok(DevicePair {
            source: source.to_string(),
            destination: destination.to_string(),
        })
    }
}

/// A QEMU character device that is a unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chardev {
    /// Its label (`-chardev id=`).
    pub label: String,
    /// The socket path.
    pub path: PathBuf,
}

/// The unix-socket character devices in a `query-chardev` reply. QEMU
/// names a socket chardev `unix:PATH[,server=on]`, with `disconnected:`
/// in front while it is not connected.
pub fn unix_chardevs(side: Side, reply: &Value) -> Result<Vec<Chardev>, MappingError> {
    let entries = reply.as_array().ok_or_else(|| MappingError::BadChardevs {
        side,
        what: "not an array".to_string(),
    })?;
    let mut chardevs = Vec::new();
    for entry in entries {
        let (Some(label), Some(filename)) = (
            entry.get("label").and_then(Value::as_str),
            entry.get("filename").and_then(Value::as_str),
        ) else {
            return Err(MappingError::BadChardevs {
                side,
                what: format!("an entry without label or filename: {entry}"),
            });
        };
        let filename = filename.strip_prefix("disconnected:").unwrap_or(filename);
        if let Some(rest) = filename.strip_prefix("unix:") {
            let path = rest.split(',').next().unwrap_or(rest);
            chardevs.push(Chardev {
                label: label.to_string(),
                path: PathBuf::from(path),
            });
        }
    }
    Ok(chardevs)
}

/// A device of the VM, on both agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedDevice {
    /// The source agent's device.
    pub source: AgentDevice,
    /// The destination agent's device.
    pub destination: AgentDevice,
    /// The character device that connects QEMU to it, when known.
    pub chardev: Option<String>,
}

/// Two socket paths name the same socket (resolved when both exist).
fn same_socket(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn served_by<'a>(chardev: &Chardev, devices: &'a [AgentDevice]) -> Option<&'a AgentDevice> {
    devices
        .iter()
        .find(|device| same_socket(&device.socket, &chardev.path))
}

fn find<'a>(
    side: Side,
    devices: &'a [AgentDevice],
    id: &str,
) -> Result<&'a AgentDevice, MappingError> {
    devices
        .iter()
        .find(|device| device.id == id)
        .ok_or_else(|| MappingError::NoSuchDevice {
            side,
            id: id.to_string(),
            served: devices
                .iter()
                .map(|device| device.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn pair(
    source: &AgentDevice,
    destination: &AgentDevice,
    chardev: Option<String>,
) -> Result<MappedDevice, MappingError> {
    if source.kind != destination.kind {
        return Err(MappingError::KindMismatch {
            source_id: source.id.clone(),
            source_kind: source.kind.clone(),
            destination_id: destination.id.clone(),
            destination_kind: destination.kind.clone(),
        });
    }
    Ok(MappedDevice {
        source: source.clone(),
        destination: destination.clone(),
        chardev,
    })
}

/// The VM's devices on both agents: `explicit` pairs when given, else
/// those found through the QEMUs' character devices (module docs).
pub fn map_devices(
    explicit: &[DevicePair],
    source_devices: &[AgentDevice],
    destination_devices: &[AgentDevice],
    source_chardevs: &[Chardev],
    destination_chardevs: &[Chardev],
) -> Result<Vec<MappedDevice>, MappingError> {
    let mut mapped: Vec<MappedDevice> = Vec::new();
    if !explicit.is_empty() {
        for wanted in explicit {
            let source = find(Side::Source, source_devices, &wanted.source)?;
            let destination = find(Side::Destination, destination_devices, &wanted.destination)?;
            let chardev = source_chardevs
                .iter()
                .find(|chardev| same_socket(&chardev.path, &source.socket))
                .map(|chardev| chardev.label.clone());
            mapped.push(pair(source, destination, chardev)?);
        }
    } else {
        for chardev in source_chardevs {
            let Some(source) = served_by(chardev, source_devices) else {
                continue;
            };
            let counterpart = destination_chardevs
                .iter()
                .find(|other| other.label == chardev.label);
            let destination = counterpart.and_then(|other| served_by(other, destination_devices));
            let Some(destination) = destination else {
                return Err(MappingError::NoCounterpart {
                    device: source.id.clone(),
                    label: chardev.label.clone(),
                    found: match counterpart {
                        Some(other) => format!(
                            "{}, which the destination agent does not serve",
                            other.path.display()
                        ),
                        None => "missing".to_string(),
                    },
                });
            };
            mapped.push(pair(source, destination, Some(chardev.label.clone()))?);
        }
        if mapped.is_empty() {
            let list = |paths: Vec<String>| {
                if paths.is_empty() {
                    "none".to_string()
                } else {
                    paths.join(", ")
                }
            };
            return Err(MappingError::NothingServed {
                chardevs: list(
                    source_chardevs
                        .iter()
                        .map(|chardev| chardev.path.display().to_string())
                        .collect(),
                ),
                sockets: list(
                    source_devices
                        .iter()
                        .map(|device| device.socket.display().to_string())
                        .collect(),
                ),
            });
        }
    }
    for (index, device) in mapped.iter().enumerate() {
        let twice = mapped[..index].iter().any(|other| {
            other.source.id == device.source.id || other.destination.id == device.destination.id
        });
        if twice {
            return Err(MappingError::Twice(device.source.id.clone()));
        }
    }
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device(id: &str, kind: &str, socket: &str) -> AgentDevice {
        AgentDevice {
            id: id.to_string(),
            kind: kind.to_string(),
            socket: PathBuf::from(socket),
            fence_mode: None,
            abandoned_outstanding: None,
            fence_open: None,
        }
    }

    fn chardevs(side: Side, pairs: &[(&str, &str)]) -> Vec<Chardev> {
        let reply: Vec<Value> = pairs
            .iter()
            .map(|(label, filename)| json!({"label": label, "filename": filename, "frontend-open": true}))
            .collect();
        unix_chardevs(side, &Value::Array(reply)).unwrap()
    }

    #[test]
    fn devices_are_found_by_socket_and_paired_by_chardev_label() {
        let source = [
            device("net0", "net", "/s/net.sock"),
            device("disk0", "blk", "/s/blk.sock"),
            device("spare", "blk", "/s/x.sock"),
        ];
        let destination = [
            device("disk9", "blk", "/d/blk.sock"),
            device("net0", "net", "/d/net.sock"),
        ];
        let src = chardevs(
            Side::Source,
            &[
                ("serial0", "file:/tmp/log"),
                ("char0", "unix:/s/blk.sock"),
                ("netchar0", "disconnected:unix:/s/net.sock,server=on"),
            ],
        );
        let dst = chardevs(
            Side::Destination,
            &[
                ("netchar0", "unix:/d/net.sock"),
                ("char0", "unix:/d/blk.sock"),
            ],
        );
        assert_eq!(src.len(), 2, "the file chardev is not a socket");
        let mapped = map_devices(&[], &source, &destination, &src, &dst).unwrap();
        let ids: Vec<(&str, &str, Option<&str>)> = mapped
            .iter()
            .map(|m| {
                (
                    m.source.id.as_str(),
                    m.destination.id.as_str(),
                    m.chardev.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("disk0", "disk9", Some("char0")),
                ("net0", "net0", Some("netchar0"))
            ]
        );
    }

    #[test]
    fn a_device_without_a_counterpart_or_a_vm_without_served_devices_is_an_error() {
        let source = [device("disk0", "blk", "/s/blk.sock")];
        let destination = [device("disk0", "blk", "/d/other.sock")];
        let src = chardevs(Side::Source, &[("char0", "unix:/s/blk.sock")]);
        let dst = chardevs(Side::Destination, &[("char0", "unix:/d/blk.sock")]);
        let error = map_devices(&[], &source, &destination, &src, &dst).unwrap_err();
        assert!(
            matches!(error, MappingError::NoCounterpart { .. }),
            "{error}"
        );
        let error = map_devices(&[], &source, &destination, &dst, &dst).unwrap_err();
        assert!(
            matches!(error, MappingError::NothingServed { .. }),
            "{error}"
        );
    }

    #[test]
    fn explicit_pairs_are_checked_against_both_agents() {
        let source = [
            device("net0", "net", "/s/net.sock"),
            device("disk0", "blk", "/s/blk.sock"),
        ];
        let destination = [device("net1", "net", "/d/net.sock")];
        let pairs: Vec<DevicePair> = ["net0=net1".parse().unwrap()].to_vec();
        let mapped = map_devices(&pairs, &source, &destination, &[], &[]).unwrap();
        assert_eq!(mapped[0].destination.id, "net1");
        let error = map_devices(
            &["disk0=net1".parse().unwrap()],
            &source,
            &destination,
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(error, MappingError::KindMismatch { .. }),
            "{error}"
        );
        let error =
            map_devices(&["disk0".parse().unwrap()], &source, &destination, &[], &[]).unwrap_err();
        assert!(
            matches!(
                error,
                MappingError::NoSuchDevice {
                    side: Side::Destination,
                    ..
                }
            ),
            "{error}"
        );
        assert!("=x".parse::<DevicePair>().is_err());
        let twice: Vec<DevicePair> =
            ["net0=net1".parse().unwrap(), "net0=net1".parse().unwrap()].to_vec();
        assert!(matches!(
            map_devices(&twice, &source, &destination, &[], &[]),
            Err(MappingError::Twice(_))
        ));
    }

    #[test]
    fn malformed_query_chardev_is_an_error() {
        assert!(unix_chardevs(Side::Source, &json!({"x": 1})).is_err());
        assert!(unix_chardevs(Side::Source, &json!([{"label": 3}])).is_err());
    }
}
