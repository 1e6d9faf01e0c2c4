//! `[partitioning]`: which partitions of a partitioned queue
//! (`queues[].partitions`) this instance consumes.

use super::*;

/// `[partitioning]`
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartitioningConfig {
    /// This instance's number, `0..instance_count` (a StatefulSet's pod
    /// ordinal: `FLOWGATE__PARTITIONING__INSTANCE_INDEX`). The instance
    /// consumes partition `p` of every partitioned queue when
    /// `p % instance_count == instance_index`. Set with `instance_count`.
    /// Default none: every instance subscribes to every partition and the
    /// partitions' single active consumer keeps each in order.
    #[serde(default)]
    pub instance_index: Option<u32>,
    /// How many instances share the partitions (the StatefulSet's
    /// replicas). Set with `instance_index`. Default none.
    #[serde(default)]
    pub instance_count: Option<u32>,
}

impl PartitioningConfig {
    /// Whether this instance consumes `partition`: every partition without
    /// `instance_index`/`instance_count`.
    pub fn owns(&self, partition: u16) -> bool {
        match (self.instance_index, self.instance_count) {
            (Some(index), Some(count)) if count > 0 => u32::from(partition) % count == index,
            _ => true,
        }
    }

    /// Both keys or neither, `instance_count >= 1`, `instance_index <
    /// instance_count`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match (self.instance_index, self.instance_count) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(ConfigError::new(
                "partitioning.instance_count",
                "is needed with partitioning.instance_index",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "partitioning.instance_index",
                "is needed with partitioning.instance_count",
            )),
            (Some(_), Some(0)) => Err(ConfigError::new(
                "partitioning.instance_count",
                "must be at least 1",
            )),
            (Some(i), Some(n)) if i >= n => Err(ConfigError::new(
                "partitioning.instance_index",
                format!("must be below instance_count ({n}), not {i}"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(index: Option<u32>, count: Option<u32>) -> PartitioningConfig {
        PartitioningConfig {
            instance_index: index,
            instance_count: count,
        }
    }

    #[test]
    fn instances_share_the_partitions_round_robin() {
        let owned = |c: PartitioningConfig| (0..4).filter(|&i| c.owns(i)).collect::<Vec<_>>();
        assert_eq!(owned(p(Some(0), Some(2))), [0, 2]);
        assert_eq!(owned(p(Some(1), Some(2))), [1, 3]);
        assert_eq!(owned(p(Some(2), Some(3))), [2]);
        assert_eq!(owned(p(None, None)), [0, 1, 2, 3], "unset: all of them");
        assert_eq!(owned(p(Some(0), Some(1))), [0, 1, 2, 3]);
    }

    #[test]
    fn both_keys_or_neither_and_the_index_below_the_count() {
        assert!(p(None, None).validate().is_ok());
        assert!(p(Some(1), Some(2)).validate().is_ok());
        let key = |c: PartitioningConfig| c.validate().unwrap_err().key;
        assert_eq!(key(p(Some(0), None)), "partitioning.instance_count");
        assert_eq!(key(p(None, Some(2))), "partitioning.instance_index");
        assert_eq!(key(p(Some(0), Some(0))), "partitioning.instance_count");
        assert_eq!(key(p(Some(2), Some(2))), "partitioning.instance_index");
    }
}
