//! The one ordering of top-N lists (SPEC §2): count descending, then `ad_id` ascending in byte
//! order. Used by the engine's shards and reducer and by popular-ads queries.

use std::cmp::Ordering;

use crate::event::AdId;

/// An ad and its count, as ranked.
pub type Ranked = (AdId, u64);

/// `Less` when `a` ranks before `b`.
pub fn order(a: &Ranked, b: &Ranked) -> Ordering {
    b.1.cmp(&a.1).then_with(|| a.0.as_str().as_bytes().cmp(b.0.as_str().as_bytes()))
}

/// The first `n` of `items` in rank order, sorted. O(len) selection plus O(n log n).
pub fn top(mut items: Vec<Ranked>, n: usize) -> Vec<Ranked> {
    if items.len() > n {
        if n == 0 {
            return Vec::new();
        }
        items.select_nth_unstable_by(n - 1, order);
        items.truncate(n);
    }
    items.sort_unstable_by(order);
    items
}

/// Raises `ad`'s count in a sorted top-`n` list, keeping it exact. Counts only ever rise, so an
/// ad outside the list can enter only through its own increase: this is all the list needs.
pub fn raise(list: &mut Vec<Ranked>, n: usize, ad: &AdId, count: u64) {
    if let Some(i) = list.iter().position(|(a, _)| a == ad) {
        list.remove(i);
    } else if list.len() >= n {
        let last = list.last().expect("n > 0 when the list is full");
        if order(&(ad.clone(), count), last) != Ordering::Less {
            return;
        }
        list.pop();
    }
    let entry = (ad.clone(), count);
    let at = list.partition_point(|e| order(e, &entry) == Ordering::Less);
    list.insert(at, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ad: &str, c: u64) -> Ranked {
        (AdId::new(ad), c)
    }

    #[test]
    fn ties_break_by_ad_id_bytes() {
        let got = top(vec![r("b", 5), r("a", 5), r("B", 5), r("c", 9), r("é", 5), r("z", 1)], 4);
        assert_eq!(got, vec![r("c", 9), r("B", 5), r("a", 5), r("b", 5)]);
        assert_eq!(top(vec![r("a", 1)], 0), vec![]);
    }

    #[test]
    fn raise_matches_full_recompute() {
        let mut counts = std::collections::BTreeMap::new();
        let mut list = Vec::new();
        let mut x = 7u64;
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let ad = AdId::new(&format!("ad{}", (x >> 33) % 40));
            let c = counts.entry(ad.clone()).or_insert(0u64);
            *c += (x >> 20) % 3 + 1;
            raise(&mut list, 5, &ad, *c);
            let all = counts.iter().map(|(a, c)| (a.clone(), *c)).collect();
            assert_eq!(list, top(all, 5));
        }
    }
}
