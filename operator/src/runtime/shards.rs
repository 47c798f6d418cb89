//! Which runs a process owns when several share the work: shard `k` of `N` owns the WorkflowRuns labelled
//! `flowtel.dev/shard=k`, and shard 0 also every run whose label is missing or names no other shard, so each run
//! is owned by exactly one shard. The Jobs and pods of a run carry its label, so one selector narrows all of a
//! shard's watches (`docs/scaling.md`).

use std::fmt;
use std::str::FromStr;

/// The label that assigns a WorkflowRun (and its Jobs and pods) to a shard.
pub const SHARD_LABEL: &str = "flowtel.dev/shard";

/// Most shards a deployment may have: shard 0's selector lists every other shard.
pub const MAX_SHARDS: u32 = 256;

/// Shard `index` of `count`, from 0; the default `0/1` owns everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShardError {
    #[error("--shard {0:?}: expected <index>/<count>, like 1/4 (shards are counted from 0)")]
    Format(String),
    #[error("--shard {given:?}: the count must be 1 to {MAX_SHARDS} and the index below it")]
    OutOfRange { given: String },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (index, count) = text.split_once('/').ok_or_else(|| ShardError::Format(text.into()))?;
        let number = |part: &str| part.trim().parse::<u32>().map_err(|_| ShardError::Format(text.into()));
        let shard = Shard { index: number(index)?, count: number(count)? };
        if shard.count == 0 || shard.count > MAX_SHARDS || shard.index >= shard.count {
            return Err(ShardError::OutOfRange { given: text.into() });
        }
        Ok(shard)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The label selector of what this shard owns; None when it is the only one. Shard 0 takes a run whose label
    /// is missing or malformed (`notin` matches an absent label), so no run is left without an owner.
    pub fn selector(&self) -> Option<String> {
        match (self.count, self.index) {
            (1, _) => None,
            (_, 0) => {
                let others: Vec<String> = (1..self.count).map(|k| k.to_string()).collect();
                Some(format!("{SHARD_LABEL} notin ({})", others.join(",")))
            }
            (_, k) => Some(format!("{SHARD_LABEL}={k}")),
        }
    }

    /// Whether a run with this shard label value (None: no label) is this shard's: what `selector` selects.
    pub fn owns(&self, label: Option<&str>) -> bool {
        // Selectors compare strings: "01" is not shard 1's.
        let claimed_by_another = |value: &str| (1..self.count).find(|k| k.to_string() == value);
        match label.and_then(claimed_by_another) {
            Some(k) => k == self.index,
            None => self.index == 0,
        }
    }

    /// Each shard elects its own leader: `base` for a single shard (as before sharding), else `base-shard-<k>`.
    pub fn lease_name(&self, base: &str) -> String {
        match self.count {
            1 => base.to_string(),
            _ => format!("{base}-shard-{}", self.index),
        }
    }

    /// Cluster-wide work that must not run once per shard (the TelemetryStack controller) runs on shard 0.
    pub fn runs_cluster_wide_work(&self) -> bool {
        self.index == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_from_index_over_count_and_bad_input_names_the_flag() {
        assert_eq!("1/4".parse(), Ok(Shard { index: 1, count: 4 }));
        assert_eq!("0/1".parse(), Ok(Shard::default()));
        assert_eq!("255/256".parse::<Shard>().map(|s| s.to_string()), Ok("255/256".into()));
        for bad in ["1", "a/2", "1/", "-1/2"] {
            assert_eq!(bad.parse::<Shard>(), Err(ShardError::Format(bad.into())), "{bad}");
        }
        for bad in ["2/2", "0/0", "0/257"] {
            let error = bad.parse::<Shard>().unwrap_err();
            assert_eq!(error, ShardError::OutOfRange { given: bad.into() });
            assert!(error.to_string().starts_with(&format!("--shard \"{bad}\"")), "{error}");
        }
    }

    #[test]
    fn every_label_value_is_owned_by_exactly_one_shard() {
        let count = 3;
        let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
        for label in [None, Some("0"), Some("1"), Some("2"), Some("3"), Some("x"), Some(""), Some("01")] {
            let owners: Vec<u32> = shards.iter().filter(|s| s.owns(label)).map(|s| s.index).collect();
            assert_eq!(owners.len(), 1, "{label:?} is owned by {owners:?}");
        }
        assert!(shards[1].owns(Some("1")) && shards[2].owns(Some("2")));
        assert!(shards[0].owns(None) && shards[0].owns(Some("3")) && shards[0].owns(Some("01")));
    }

    #[test]
    fn selectors_and_leases_per_shard_a_single_shard_unchanged() {
        let sole = Shard::default();
        assert_eq!((sole.selector(), sole.lease_name("flowtel")), (None, "flowtel".into()));
        let first = Shard { index: 0, count: 3 };
        assert_eq!(first.selector().as_deref(), Some("flowtel.dev/shard notin (1,2)"));
        assert_eq!(first.lease_name("flowtel"), "flowtel-shard-0");
        let second = Shard { index: 2, count: 3 };
        assert_eq!(second.selector().as_deref(), Some("flowtel.dev/shard=2"));
        assert!(first.runs_cluster_wide_work() && !second.runs_cluster_wide_work());
    }
}
