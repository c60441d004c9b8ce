//! The settings that change results, recorded with the data: a start with other values is
//! refused, naming each difference.

use super::{Context as _, Store, StoreError, META};
use redb::ReadableTable;

impl Store {
    /// Compares the settings that change results with those recorded with the data, and
    /// records them when there are none yet. Each entry is (key, value as written).
    pub fn check_settings(&self, settings: &[(String, String)]) -> Result<(), SettingsError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            let stored: Option<Vec<(String, String)>> = meta
                .get("settings")
                .ctx("read settings")?
                .map(|v| serde_json::from_slice(v.value()))
                .transpose()
                .map_err(|e| SettingsError::Corrupt(e.to_string()))?;
            match stored {
                Some(stored) => {
                    let changed = diff_settings(&stored, settings);
                    if !changed.is_empty() {
                        return Err(SettingsError::Changed(changed));
                    }
                    return Ok(());
                }
                None => {
                    let json = serde_json::to_vec(settings).expect("strings serialize");
                    meta.insert("settings", json.as_slice()).ctx("write settings")?;
                }
            }
        }
        txn.commit().ctx("commit")?;
        Ok(())
    }
}

/// Why a data directory refuses the configured settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{}", describe_changes(.0))]
    Changed(Vec<(String, String, String)>),
    #[error("the recorded settings are unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_changes(changes: &[(String, String, String)]) -> String {
    let list: Vec<String> = changes
        .iter()
        .map(|(k, old, new)| {
            format!("{k}: the data was aggregated with {old}, the config has {new}")
        })
        .collect();
    format!(
        "settings that change results differ from those this data directory was aggregated with:\n  {}\n\
         Counts already stored would mix two definitions. Use the recorded values, or start a new \
         data_dir with the new ones (and send the raw clicks again, or recalculate once that exists).",
        list.join("\n  ")
    )
}

/// (key, old, new) for every key whose value differs, is missing or is new.
fn diff_settings(
    old: &[(String, String)],
    new: &[(String, String)],
) -> Vec<(String, String, String)> {
    let get = |list: &[(String, String)], k: &str| {
        list.iter().find(|(key, _)| key == k).map_or("(none)".to_string(), |(_, v)| v.clone())
    };
    let mut keys: Vec<&String> = old.iter().chain(new).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (get(old, k), get(new, k));
            (a != b).then(|| (k.clone(), a, b))
        })
        .collect()
}
