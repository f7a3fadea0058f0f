//! A server's sessions in the catalog: registration of each Hello (inventory, disks
//! created or resumed, the verdict on the agent's resume claim), disconnects, and the
//! list of servers with their disks.

use super::*;

/// A source server as the receiver knows it. JSON field names are part of the status
/// interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerRecord {
    pub server_id: String,
    /// The agent installation that last connected for this server.
    pub agent_id: String,
    pub agent_version: String,
    pub inventory: InventoryRecord,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The server's consistent epoch: the highest epoch made durable on all of its
    /// streams and disks. Epochs continue across sessions.
    pub durable_epoch: u64,
    /// Unix milliseconds when `durable_epoch` became durable (0: never).
    #[serde(default)]
    pub consistent_at_ms: u64,
    /// The series (hex) of the agent process of the latest session: a reconnect of that
    /// process may resume from its in-memory dirty map.
    #[serde(default)]
    pub live_series: String,
    /// The chain id recorded at the agent's last clean shutdown; consumed by the next
    /// session, whatever it claims.
    #[serde(default)]
    pub checkpoint: Option<ChainId>,
}

/// Why a session could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "source server {server} has {known} disk(s) in the catalog and this Hello adds {added}: at most {MAX_DISKS} per server; forget the ones it no longer replicates with `blockferry-receiver disk forget --server {server} --disk NAME`"
    )]
    TooManyDisks {
        server: String,
        known: usize,
        added: usize,
    },
    #[error(
        "source server {server} was cut over to its launched copy (at Unix ms {at_ms}): its replication is over; stop and remove its agent"
    )]
    CutOver { server: String, at_ms: u64 },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl<E: Into<redb::Error>> From<E> for RegisterError {
    fn from(err: E) -> Self {
        Self::Catalog(CatalogError::Storage(err.into()))
    }
}

/// Series (hex) and sequence number of an agent's clean-shutdown state record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainId {
    pub series: String,
    pub seq: u64,
}

/// Lower-case hex of a series id.
pub fn series_hex(series: &[u8; 16]) -> String {
    series.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InventoryRecord {
    pub host_name: String,
    pub host_id: String,
    pub cpus: Vec<CpuRecord>,
    pub ram_bytes: u64,
    pub os: String,
    pub disks: Vec<DiskSpecRecord>,
    pub private_ips: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuRecord {
    pub model: String,
    pub cores: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpecRecord {
    pub name: String,
    pub size: u64,
}

impl From<&Inventory> for InventoryRecord {
    fn from(inv: &Inventory) -> Self {
        Self {
            host_name: inv.host_name.clone(),
            host_id: inv.host_id.clone(),
            cpus: inv
                .cpus
                .iter()
                .map(|c| CpuRecord {
                    model: c.model.clone(),
                    cores: c.cores,
                })
                .collect(),
            ram_bytes: inv.ram_bytes,
            os: inv.os.clone(),
            disks: inv
                .disks
                .iter()
                .map(|d| DiskSpecRecord {
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
            private_ips: inv.private_ips.clone(),
        }
    }
}

/// What [`Catalog::register_session`] recorded and found.
#[derive(Debug)]
pub struct Registered {
    /// The server's consistent epoch.
    pub durable_epoch: u64,
    /// The disks, in Hello order.
    pub disks: Vec<DiskRecord>,
    /// The agent of the server's previous session (None: first contact).
    pub previous_agent: Option<String>,
    pub settings: ServerSettings,
}

/// Why the agent's claim about its changes cannot be trusted, or `None` if it can.
fn resume_verdict(
    previous: &ServerRecord,
    identity: &AgentIdentity,
    hello: &Hello,
) -> Option<RescanReason> {
    if previous.agent_id != identity.agent_id {
        return Some(RescanReason::AGENT_REINSTALLED);
    }
    match hello.resume {
        ResumeClaim::Live if previous.live_series == series_hex(&hello.series) => None,
        ResumeClaim::Checkpoint { series, seq }
            if previous
                .checkpoint
                .as_ref()
                .is_some_and(|c| c.series == series_hex(&series) && c.seq == seq) =>
        {
            None
        }
        ResumeClaim::NoRecord => Some(RescanReason::UNCLEAN_SHUTDOWN),
        ResumeClaim::RescanRequested => Some(RescanReason::OPERATOR_REQUEST),
        ResumeClaim::TrackingLost => Some(RescanReason::TRACKING_LOST),
        ResumeClaim::Live
        | ResumeClaim::Checkpoint { .. }
        | ResumeClaim::InvalidRecord
        | ResumeClaim::Unknown { .. } => Some(RescanReason::STATE_MISMATCH),
    }
}

impl Catalog {
    /// Records a new session of `identity`: the server's inventory, and each disk of the
    /// Hello, created or resumed, with the reason it must be rescanned if the agent's
    /// claim about its changes cannot be trusted. Returns the server's consistent epoch,
    /// the disks in Hello order, the previous session's agent and the server's settings.
    /// A disk whose size changed starts its initial sync again into the resized image.
    ///
    /// A server has at most [`MAX_DISKS`] disks in the catalog, counting those of earlier
    /// sessions that this Hello does not name: a Hello that would go beyond is refused
    /// and records nothing.
    pub fn register_session(
        &self,
        identity: &AgentIdentity,
        hello: &Hello,
        images_dir: &Path,
    ) -> Result<Registered, RegisterError> {
        let txn = self.db.begin_write()?;
        {
            let server = identity.server_id.as_str();
            if let Some(raw) = txn.open_table(launches::CUT_OVER)?.get(server)? {
                let mark: CutOverRecord = decode(server, raw.value())?;
                return Err(RegisterError::CutOver {
                    server: server.to_owned(),
                    at_ms: mark.at_ms,
                });
            }
        }
        {
            let disks = txn.open_table(DISKS)?;
            let server = identity.server_id.as_str();
            let mut known = Vec::new();
            for entry in disks.range((server, "")..)? {
                let (key, _) = entry?;
                let (disk_server, name) = key.value();
                if disk_server != server {
                    break;
                }
                known.push(name.to_owned());
            }
            let added = hello
                .disks
                .iter()
                .filter(|d| !known.contains(&d.name))
                .count();
            if known.len() + added > MAX_DISKS {
                return Err(RegisterError::TooManyDisks {
                    server: server.to_owned(),
                    known: known.len(),
                    added,
                });
            }
        }
        let mut disks_out = Vec::with_capacity(hello.disks.len());
        let durable_epoch;
        let previous_agent;
        let server_settings;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let now = now();
            let previous: Option<ServerRecord> = match servers.get(identity.server_id.as_str())? {
                Some(raw) => Some(decode(&identity.server_id, raw.value())?),
                None => None,
            };
            // Whether the changes the receiver lacks are exactly the agent's dirty map.
            let untrusted = previous
                .as_ref()
                .and_then(|p| resume_verdict(p, identity, hello));
            let record = ServerRecord {
                server_id: identity.server_id.clone(),
                agent_id: identity.agent_id.clone(),
                agent_version: hello.agent_version.clone(),
                inventory: InventoryRecord::from(&hello.inventory),
                first_seen: previous.as_ref().map_or(now, |p| p.first_seen),
                last_seen: now,
                durable_epoch: previous.as_ref().map_or(0, |p| p.durable_epoch),
                consistent_at_ms: previous.as_ref().map_or(0, |p| p.consistent_at_ms),
                live_series: series_hex(&hello.series),
                // A checkpoint is good for one resume, matched or not.
                checkpoint: None,
            };
            durable_epoch = record.durable_epoch;
            previous_agent = previous.as_ref().map(|p| p.agent_id.clone());
            servers.insert(identity.server_id.as_str(), encode(&record).as_slice())?;
            // A new server gets the template's settings, unless an operator set its own
            // before it first connected.
            let mut settings = txn.open_table(SETTINGS)?;
            let own = settings
                .get(identity.server_id.as_str())?
                .map(|raw| raw.value().to_vec());
            let raw = match own {
                Some(raw) => raw,
                None => {
                    let template = match settings.get(DEFAULT_SETTINGS)? {
                        Some(raw) => raw.value().to_vec(),
                        None => encode(&ServerSettings::default()),
                    };
                    settings.insert(identity.server_id.as_str(), template.as_slice())?;
                    template
                }
            };
            server_settings = decode(&identity.server_id, &raw)?;

            let mut disks = txn.open_table(DISKS)?;
            for spec in &hello.disks {
                let key = (identity.server_id.as_str(), spec.name.as_str());
                let existing: Option<DiskRecord> = match disks.get(key)? {
                    Some(raw) => Some(decode(&spec.name, raw.value())?),
                    None => None,
                };
                let mut disk = match existing {
                    Some(d) if d.size == spec.size => {
                        let mut d = d;
                        let reason = if !d.rescan_reason.is_empty() {
                            // An unfinished rescan goes on, for its original reason.
                            None
                        } else if d.rescan_requested {
                            Some(RescanReason::OPERATOR_REQUEST)
                        } else {
                            untrusted
                        };
                        // Nothing below the watermark is in place for a disk that has
                        // not synced anything yet: no rescan needed.
                        if let Some(reason) = reason.filter(|_| d.sync_watermark > 0) {
                            d.rescan_reason = reason.name().to_owned();
                            d.last_rescan_reason = d.rescan_reason.clone();
                            d.rescanned_bytes = 0;
                            d.resent_bytes = 0;
                        }
                        d.rescan_requested = false;
                        d
                    }
                    Some(mut d) => {
                        d.size = spec.size;
                        d.sync_watermark = 0;
                        d.rescan_reason.clear();
                        d.rescan_requested = false;
                        d.set_state(DiskState::INITIAL_SYNC, "disk_resized");
                        d
                    }
                    None => {
                        let mut d = DiskRecord::new(
                            &spec.name,
                            spec.size,
                            images_dir
                                .join(&identity.server_id)
                                .join(format!("{}.img", spec.name)),
                        );
                        let reason = if previous.is_some() {
                            RescanReason::DISK_ADDED
                        } else {
                            RescanReason::FIRST_CONTACT
                        };
                        d.set_state(DiskState::INITIAL_SYNC, reason.name());
                        d
                    }
                };
                if disk.sync_complete() {
                    if !disk.rescan_reason.is_empty() {
                        let reason = disk.rescan_reason.clone();
                        disk.set_state(DiskState::RESCAN, &reason);
                    } else if disk.disk_state() != DiskState::CONTINUOUS {
                        disk.set_state(DiskState::CONTINUOUS, "reconnected");
                    }
                } else if disk.disk_state() != DiskState::INITIAL_SYNC {
                    disk.set_state(DiskState::INITIAL_SYNC, "reconnected");
                }
                disks.insert(key, encode(&disk).as_slice())?;
                disks_out.push(disk);
            }
        }
        txn.commit().map_err(CatalogError::from)?;
        Ok(Registered {
            durable_epoch,
            disks: disks_out,
            previous_agent,
            settings: server_settings,
        })
    }

    /// Marks the disks of a server whose session ended.
    pub fn mark_disconnected(
        &self,
        server_id: &str,
        disk_names: &[String],
        reason: &str,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            for name in disk_names {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                if let Some(mut disk) = disk {
                    disk.set_state(DiskState::DISCONNECTED, reason);
                    disks.insert(key, encode(&disk).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every server with its disks, ordered by server id and disk name.
    pub fn servers(&self) -> Result<Vec<(ServerRecord, Vec<DiskRecord>)>, CatalogError> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let disks = txn.open_table(DISKS)?;
        let mut out = Vec::new();
        for entry in servers.iter()? {
            let (key, value) = entry?;
            let server: ServerRecord = decode(key.value(), value.value())?;
            let mut server_disks = Vec::new();
            let id = server.server_id.as_str();
            for entry in disks.range((id, "")..)? {
                let (key, value) = entry?;
                let (disk_server, disk_name) = key.value();
                if disk_server != id {
                    break;
                }
                server_disks.push(decode(disk_name, value.value())?);
            }
            out.push((server, server_disks));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(agent: &str, live_series: [u8; 16], checkpoint: Option<ChainId>) -> ServerRecord {
        ServerRecord {
            server_id: "srv".into(),
            agent_id: agent.into(),
            agent_version: String::new(),
            inventory: InventoryRecord::default(),
            first_seen: 0,
            last_seen: 0,
            durable_epoch: 0,
            consistent_at_ms: 0,
            live_series: series_hex(&live_series),
            checkpoint,
        }
    }

    fn hello(series: [u8; 16], resume: ResumeClaim) -> Hello {
        Hello {
            agent_version: String::new(),
            inventory: Inventory::default(),
            disks: Vec::new(),
            streams: 1,
            series,
            resume,
        }
    }

    /// Only a claim the receiver can check against its own record is trusted; every
    /// other one makes the disks rescan, each for its own reason.
    #[test]
    fn the_resume_verdict_trusts_only_what_the_catalog_recorded() {
        let identity = AgentIdentity {
            agent_id: "a1".into(),
            server_id: "srv".into(),
        };
        let chain = ChainId {
            series: series_hex(&[3; 16]),
            seq: 7,
        };
        let known = server("a1", [1; 16], Some(chain));
        let verdict = |record: &ServerRecord, claim| {
            resume_verdict(record, &identity, &hello([1; 16], claim))
        };
        assert_eq!(verdict(&known, ResumeClaim::Live), None);
        assert_eq!(
            verdict(
                &known,
                ResumeClaim::Checkpoint {
                    series: [3; 16],
                    seq: 7
                }
            ),
            None
        );
        for (claim, reason) in [
            (
                ResumeClaim::Checkpoint {
                    series: [3; 16],
                    seq: 8,
                },
                RescanReason::STATE_MISMATCH,
            ),
            (ResumeClaim::NoRecord, RescanReason::UNCLEAN_SHUTDOWN),
            (ResumeClaim::InvalidRecord, RescanReason::STATE_MISMATCH),
            (ResumeClaim::RescanRequested, RescanReason::OPERATOR_REQUEST),
            (ResumeClaim::TrackingLost, RescanReason::TRACKING_LOST),
            (
                ResumeClaim::Unknown {
                    tag: 77,
                    rest: vec![],
                },
                RescanReason::STATE_MISMATCH,
            ),
        ] {
            assert_eq!(verdict(&known, claim.clone()), Some(reason), "{claim:?}");
        }
        // Another process's series is not live; another agent is a reinstall.
        let other = server("a1", [2; 16], None);
        assert_eq!(
            verdict(&other, ResumeClaim::Live),
            Some(RescanReason::STATE_MISMATCH)
        );
        let reinstalled = server("a0", [1; 16], None);
        assert_eq!(
            verdict(&reinstalled, ResumeClaim::Live),
            Some(RescanReason::AGENT_REINSTALLED)
        );
        assert_eq!(
            RescanReason::from_name("tracking_lost"),
            Some(RescanReason::TRACKING_LOST)
        );
    }

    /// A server cut over stays cut over, and its agent's sessions are refused with why.
    #[test]
    fn a_server_cut_over_is_refused_at_registration() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let identity = AgentIdentity {
            agent_id: "a1".into(),
            server_id: "srv".into(),
        };
        let hello = hello([1; 16], ResumeClaim::NoRecord);
        catalog
            .register_session(&identity, &hello, dir.path())
            .unwrap();
        let mark = catalog.cut_over("srv").unwrap();
        assert_eq!(
            catalog.cut_over("srv").unwrap(),
            mark,
            "the first mark stays"
        );
        assert_eq!(catalog.cut_over_of("srv").unwrap(), Some(mark.clone()));
        let refused = catalog
            .register_session(&identity, &hello, dir.path())
            .unwrap_err();
        assert!(
            matches!(&refused, RegisterError::CutOver { server, at_ms } if server == "srv" && *at_ms == mark.at_ms),
            "{refused}"
        );
        assert!(refused.to_string().contains("cut over"), "{refused}");
    }
}
