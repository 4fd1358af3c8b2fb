//! Cutting a unit's remote lines into remote batches: one model and one upstream per remote
//! batch, at most `max_lines` lines and `max_bytes` bytes of input each (a line larger than
//! `max_bytes` goes alone: the remote judges it).

use std::collections::BTreeMap;

/// A line to place: its number, its upstream and model, and the bytes of its JSONL line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item<'a> {
    pub line: u64,
    pub upstream: &'a str,
    pub model: &'a str,
    pub bytes: u64,
}

/// The shards, each a list of line numbers, in line order within a (upstream, model) group.
pub fn shards(items: &[Item<'_>], max_lines: u64, max_bytes: u64) -> Vec<Vec<u64>> {
    let mut groups: BTreeMap<(&str, &str), Vec<&Item<'_>>> = BTreeMap::new();
    for it in items {
        groups.entry((it.upstream, it.model)).or_default().push(it);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by_key(|it| it.line);
        let (mut cur, mut bytes) = (Vec::new(), 0u64);
        for it in group {
            let full = cur.len() as u64 >= max_lines || (!cur.is_empty() && bytes + it.bytes > max_bytes);
            if full {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            cur.push(it.line);
            bytes += it.bytes;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(line: u64, model: &'static str, bytes: u64) -> Item<'static> {
        Item { line, upstream: "u", model, bytes }
    }

    #[test]
    fn one_model_per_shard_within_the_limits() {
        let items: Vec<_> = (0..250).map(|i| item(i, if i % 2 == 0 { "a" } else { "b" }, 10)).collect();
        let s = shards(&items, 100, u64::MAX);
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![100, 25, 100, 25]);
        assert!(s[0].iter().all(|l| l % 2 == 0) && s[2].iter().all(|l| l % 2 == 1));
        let s = shards(&[item(0, "a", 60), item(1, "a", 60), item(2, "a", 500)], 10, 100);
        assert_eq!(s, vec![vec![0], vec![1], vec![2]], "by bytes; an oversized line alone");
    }

    proptest! {
        #[test]
        fn every_line_exactly_once(sizes in prop::collection::vec((0u8..3, 1u64..50), 0..300), max_lines in 1u64..40, max_bytes in 1u64..400) {
            let models = ["a", "b", "c"];
            let items: Vec<_> = sizes.iter().enumerate().map(|(i, (m, b))| item(i as u64, models[*m as usize], *b)).collect();
            let s = shards(&items, max_lines, max_bytes);
            let mut all: Vec<u64> = s.iter().flatten().copied().collect();
            all.sort();
            prop_assert_eq!(all, (0..items.len() as u64).collect::<Vec<_>>());
            for shard in &s {
                prop_assert!(!shard.is_empty() && shard.len() as u64 <= max_lines);
                let model = items[shard[0] as usize].model;
                prop_assert!(shard.iter().all(|l| items[*l as usize].model == model));
                let bytes: u64 = shard.iter().map(|l| items[*l as usize].bytes).sum();
                prop_assert!(shard.len() == 1 || bytes <= max_bytes);
            }
        }
    }
}
