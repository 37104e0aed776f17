//! One bounded map for every cache keyed by what requests send (parsed `objects` texts,
//! leases, token proofs, OpenBao clients): a tenant sending ever new texts, pods or addresses
//! makes the agent forget old entries, never grow past its limits.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

/// At most `max_entries` entries weighing at most `max_weight` in total; inserting past
/// either limit evicts the least recently used entries.
pub struct BoundedMap<K, V> {
    max_entries: usize,
    max_weight: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    map: HashMap<K, Entry<V>>,
    weight: usize,
    tick: u64,
}

struct Entry<V> {
    value: V,
    weight: usize,
    used: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> BoundedMap<K, V> {
    /// An empty map with these limits (at least one entry).
    pub fn new(max_entries: usize, max_weight: usize) -> Self {
        Self {
            max_entries: max_entries.max(1),
            max_weight,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                weight: 0,
                tick: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value for `key`, marking it used.
    pub fn get(&self, key: &K) -> Option<V> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.get_mut(key).map(|e| {
            e.used = tick;
            e.value.clone()
        })
    }

    /// The value for `key`, without marking it used (for background upkeep).
    pub fn peek(&self, key: &K) -> Option<V> {
        self.lock().map.get(key).map(|e| e.value.clone())
    }

    /// Inserts (or replaces) `key`. An entry heavier than the whole budget is not kept.
    /// Returns the entries evicted to make room (not a replaced value), for the caller to
    /// clean up after.
    pub fn insert(&self, key: K, value: V, weight: usize) -> Vec<(K, V)> {
        let mut inner = self.lock();
        let mut evicted = Vec::new();
        if let Some(old) = inner.map.remove(&key) {
            inner.weight -= old.weight;
        }
        if weight > self.max_weight {
            return evicted;
        }
        while !inner.map.is_empty()
            && (inner.map.len() >= self.max_entries || inner.weight + weight > self.max_weight)
        {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            let e = inner.map.remove(&oldest).expect("present");
            inner.weight -= e.weight;
            evicted.push((oldest, e.value));
        }
        inner.tick += 1;
        let used = inner.tick;
        inner.weight += weight;
        inner.map.insert(
            key,
            Entry {
                value,
                weight,
                used,
            },
        );
        evicted
    }

    /// Removes `key`, returning its value.
    pub fn remove(&self, key: &K) -> Option<V> {
        let mut inner = self.lock();
        let e = inner.map.remove(key)?;
        inner.weight -= e.weight;
        Some(e.value)
    }

    /// Removes `key` only while `still` holds for its value (e.g. it is the same lease).
    pub fn remove_if(&self, key: &K, still: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut inner = self.lock();
        if !inner.map.get(key).is_some_and(|e| still(&e.value)) {
            return None;
        }
        let e = inner.map.remove(key)?;
        inner.weight -= e.weight;
        Some(e.value)
    }

    /// Changes the value of `key` in place, if present; true when it was.
    pub fn update(&self, key: &K, change: impl FnOnce(&mut V)) -> bool {
        let mut inner = self.lock();
        match inner.map.get_mut(key) {
            Some(e) => {
                change(&mut e.value);
                true
            }
            None => false,
        }
    }

    /// Drops every entry for which `keep` is false.
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        let mut inner = self.lock();
        let mut dropped = 0;
        inner.map.retain(|k, e| {
            let k = keep(k, &e.value);
            if !k {
                dropped += e.weight;
            }
            k
        });
        inner.weight -= dropped;
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total weight held.
    pub fn weight(&self) -> usize {
        self.lock().weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_cap_evicts_the_least_recently_used() {
        let m = BoundedMap::new(3, usize::MAX);
        for k in 0..3 {
            m.insert(k, k * 10, 1);
        }
        assert_eq!(m.get(&0), Some(0)); // 0 is now the most recently used
        let evicted = m.insert(3, 30, 1);
        assert_eq!(evicted, vec![(1, 10)], "1 was the least recently used");
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(&1), None);
        for k in 100..10_000 {
            m.insert(k, k, 1);
        }
        assert_eq!(m.len(), 3, "never more than the cap");
    }

    #[test]
    fn the_weight_cap_holds_and_oversized_entries_are_not_kept() {
        let m = BoundedMap::new(1000, 100);
        for k in 0..50 {
            m.insert(k, (), 30);
            assert!(m.weight() <= 100, "weight {}", m.weight());
        }
        assert_eq!(m.len(), 3);
        m.insert(99, (), 101);
        assert_eq!(m.get(&99), None, "heavier than the budget");
        m.insert(7, (), 10);
        assert_eq!((m.len(), m.weight()), (4, 100));
        m.insert(7, (), 20);
        // 7's old weight is released, then the oldest (47) makes room: 48, 49 and 7 remain.
        assert_eq!((m.len(), m.weight()), (3, 80));
        m.retain(|k, _| *k != 7);
        assert_eq!(m.weight(), 60);
        assert_eq!(m.remove_if(&49, |_| false), None);
        assert_eq!(m.remove(&49), Some(()));
        assert_eq!(m.weight(), 30);
    }
}
