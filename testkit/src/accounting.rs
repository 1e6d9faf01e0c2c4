//! Exactly-once accounting: which of the ids sent arrived, which did not,
//! which arrived more than once, and what arrived that was never sent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// How the ids that arrived compare with the ids expected.
///
/// ```
/// use flowgate_testkit::{counts, Accounting};
///
/// let expected = ["a", "b", "c"];
/// let arrived = counts(["a", "b", "b", "z"].map(String::from));
/// let acc = Accounting::of(expected, &arrived);
/// assert_eq!(acc.missing, ["c"]);
/// assert_eq!(acc.duplicates["b"], 2);
/// assert_eq!(acc.unexpected["z"], 1);
/// assert!(!acc.is_exactly_once());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// How many distinct ids were expected.
    pub expected: usize,
    /// Expected ids that never arrived (sorted).
    pub missing: Vec<String>,
    /// Expected ids that arrived more than once, with how often.
    pub duplicates: BTreeMap<String, usize>,
    /// Ids that arrived but were not expected, with how often.
    pub unexpected: BTreeMap<String, usize>,
}

impl Accounting {
    /// Compares `arrived` (how often each id arrived, e.g. from
    /// [`counts`](crate::counts) or
    /// [`Client::collect_all`](crate::Client::collect_all)) with `expected`.
    pub fn of(
        expected: impl IntoIterator<Item = impl AsRef<str>>,
        arrived: &HashMap<String, usize>,
    ) -> Accounting {
        let expected: BTreeSet<String> = expected
            .into_iter()
            .map(|id| id.as_ref().to_owned())
            .collect();
        let mut acc = Accounting {
            expected: expected.len(),
            ..Accounting::default()
        };
        for id in &expected {
            match arrived.get(id).copied().unwrap_or(0) {
                0 => acc.missing.push(id.clone()),
                1 => {}
                n => {
                    acc.duplicates.insert(id.clone(), n);
                }
            }
        }
        for (id, n) in arrived {
            if *n > 0 && !expected.contains(id) {
                acc.unexpected.insert(id.clone(), *n);
            }
        }
        acc
    }

    /// True when every expected id arrived exactly once and nothing else did.
    pub fn is_exactly_once(&self) -> bool {
        self.missing.is_empty() && self.duplicates.is_empty() && self.unexpected.is_empty()
    }

    /// Panics, saying what went wrong, unless [`is_exactly_once`](Self::is_exactly_once).
    #[track_caller]
    pub fn assert_exactly_once(&self) {
        assert!(self.is_exactly_once(), "not exactly once: {self}");
    }
}

impl fmt::Display for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// At most this many ids of each kind are listed.
        const SHOWN: usize = 10;
        write!(
            f,
            "{} expected, {} missing, {} duplicated, {} unexpected",
            self.expected,
            self.missing.len(),
            self.duplicates.len(),
            self.unexpected.len()
        )?;
        if !self.missing.is_empty() {
            let shown: Vec<_> = self.missing.iter().take(SHOWN).collect();
            write!(f, "; missing {shown:?}")?;
        }
        if !self.duplicates.is_empty() {
            let shown: Vec<_> = self.duplicates.iter().take(SHOWN).collect();
            write!(f, "; duplicated (id, times) {shown:?}")?;
        }
        if !self.unexpected.is_empty() {
            let shown: Vec<_> = self.unexpected.iter().take(SHOWN).collect();
            write!(f, "; unexpected (id, times) {shown:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counts;

    fn ids(v: &[&str]) -> HashMap<String, usize> {
        counts(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn every_id_once_is_exactly_once() {
        let acc = Accounting::of(["a", "b"], &ids(&["b", "a"]));
        assert!(acc.is_exactly_once(), "{acc}");
        acc.assert_exactly_once();
        assert_eq!(acc.expected, 2);
    }

    #[test]
    fn a_lost_id_is_missing() {
        let acc = Accounting::of(["a", "b", "c"], &ids(&["a"]));
        assert_eq!(acc.missing, ["b", "c"]);
        assert!(!acc.is_exactly_once());
    }

    #[test]
    fn an_id_twice_is_a_duplicate() {
        let acc = Accounting::of(["a", "b"], &ids(&["a", "b", "a"]));
        assert_eq!(acc.duplicates, BTreeMap::from([("a".to_owned(), 2)]));
        assert!(acc.missing.is_empty());
        assert!(!acc.is_exactly_once());
    }

    #[test]
    fn an_id_never_sent_is_unexpected() {
        let acc = Accounting::of(["a"], &ids(&["a", "x"]));
        assert_eq!(acc.unexpected, BTreeMap::from([("x".to_owned(), 1)]));
        assert!(!acc.is_exactly_once());
    }

    #[test]
    #[should_panic(expected = "1 missing")]
    fn the_assertion_says_what_went_wrong() {
        Accounting::of(["a", "b"], &ids(&["a"])).assert_exactly_once();
    }
}
