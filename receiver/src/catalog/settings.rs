//! Per-server replication settings and the template new servers start from; the
//! retention policy is one of them.

use super::*;

/// What an operator sets per source server (`settings set`). JSON field names are part
/// of the status interface.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerSettings {
    /// The agent's bandwidth limit, all streams together, in megabits per second
    /// (10^6 bit/s); 0 is unlimited.
    pub bandwidth_mbps: u64,
    /// An operator paused the server's replication (`pause`): its agent sends nothing
    /// but heartbeats, and keeps tracking changes, until `resume`.
    #[serde(default)]
    pub paused: bool,
    /// Which recovery points are kept; `None`: the template's, or the built-in default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::retention::RetentionPolicy>,
}

/// What an operator changes of a server's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SettingsChange {
    pub bandwidth_mbps: Option<u64>,
    pub paused: Option<bool>,
    #[serde(default)]
    pub retention: Option<crate::retention::RetentionPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no source server {0} in the catalog (see `blockferry-receiver status`)")]
    NoSuchServer(String),
    #[error(
        "a pause applies to one server (`--server ID`), not to the template for servers to come"
    )]
    PauseTemplate,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl ServerSettings {
    /// The limit in bytes per second, as the agent enforces it (0: unlimited).
    pub fn bandwidth_limit(&self) -> u64 {
        self.bandwidth_mbps.saturating_mul(125_000)
    }
}

impl Catalog {
    /// Changes the settings of `server_id`, or of the template for servers to come
    /// (`None`), and returns them as they now are. A server without settings of its own
    /// starts from the template, as it would at its first connection. Only a server the
    /// catalog knows can be paused: a pause of a mistyped id would pause nothing.
    pub fn update_settings(
        &self,
        server_id: Option<&str>,
        change: SettingsChange,
    ) -> Result<ServerSettings, SettingsError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let settings = {
            match (server_id, change.paused) {
                (None, Some(_)) => return Err(SettingsError::PauseTemplate),
                (Some(server), Some(_)) => {
                    let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
                    if servers.get(server).map_err(CatalogError::from)?.is_none() {
                        return Err(SettingsError::NoSuchServer(server.to_owned()));
                    }
                }
                (_, None) => {}
            }
            let mut table = txn.open_table(SETTINGS).map_err(CatalogError::from)?;
            let key = server_id.unwrap_or(DEFAULT_SETTINGS);
            let current = match table.get(key).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<ServerSettings>(key, raw.value())?),
                None => None,
            };
            let current = match current {
                Some(own) => own,
                None => match table.get(DEFAULT_SETTINGS).map_err(CatalogError::from)? {
                    Some(raw) => decode(DEFAULT_SETTINGS, raw.value())?,
                    None => ServerSettings::default(),
                },
            };
            let settings = ServerSettings {
                bandwidth_mbps: change.bandwidth_mbps.unwrap_or(current.bandwidth_mbps),
                paused: change.paused.unwrap_or(current.paused),
                retention: change.retention.or(current.retention),
            };
            table
                .insert(key, encode(&settings).as_slice())
                .map_err(CatalogError::from)?;
            settings
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(settings)
    }

    /// The template, and every server's own settings, by server id.
    pub fn all_settings(
        &self,
    ) -> Result<(ServerSettings, Vec<(String, ServerSettings)>), CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SETTINGS)?;
        let mut template = ServerSettings::default();
        let mut servers = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let settings: ServerSettings = decode(key.value(), value.value())?;
            if key.value() == DEFAULT_SETTINGS {
                template = settings;
            } else {
                servers.push((key.value().to_owned(), settings));
            }
        }
        Ok((template, servers))
    }

    /// The retention policy of `server_id`: its own, else the template's, else the
    /// built-in one.
    pub fn retention(
        &self,
        server_id: &str,
    ) -> Result<crate::retention::RetentionPolicy, CatalogError> {
        let (template, servers) = self.all_settings()?;
        let own = servers
            .into_iter()
            .find(|(id, _)| id == server_id)
            .and_then(|(_, s)| s.retention);
        Ok(own.or(template.retention).unwrap_or_default())
    }
}
