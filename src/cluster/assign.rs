//! Who should own how many partitions: a pure function of the group as one member sees it.
//!
//! Every member computes the same quotas from the same member list: with `P` partitions and `N`
//! members sorted by name, each owns `floor(P / N)`, and the first `P mod N` one more. A member
//! over its quota gives back its highest-numbered partitions; a member under it claims free ones
//! (a lease compare-and-set decides between members that claim the same partition). Nothing
//! moves while every member is at its quota, so a join moves only the partitions the newcomer
//! needs, and a leave only the leaver's.
//!
//! Members' views differ for the milliseconds a change takes to reach them; the leases keep
//! ownership exclusive meanwhile, and the plan only ever claims free partitions, so a stale view
//! can delay balance but never double-own.

use std::collections::BTreeSet;

/// What one member should do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to claim, in the order to try them.
    pub claim: Vec<u16>,
    /// Owned partitions to hand back.
    pub give_back: Vec<u16>,
}

/// How many partitions `me` should own. `members` must contain `me`.
pub fn quota(partitions: u16, members: &BTreeSet<String>, me: &str) -> usize {
    let n = members.len().max(1);
    let (base, extra) = (partitions as usize / n, partitions as usize % n);
    let rank = members.iter().position(|m| m == me).unwrap_or(n);
    base + usize::from(rank < extra)
}

/// The plan for `me`, given the members, the partitions it owns (and is not already handing
/// back), and which partitions are free (no live lease).
pub fn plan(
    partitions: u16,
    members: &BTreeSet<String>,
    me: &str,
    mine: &BTreeSet<u16>,
    free: &BTreeSet<u16>,
) -> Plan {
    let want = quota(partitions, members, me);
    let mut plan = Plan::default();
    if mine.len() > want {
        plan.give_back = mine.iter().rev().take(mine.len() - want).copied().collect();
    } else if mine.len() < want && !free.is_empty() {
        // Members claiming at once start at different places, so they rarely collide.
        let rank = members.iter().position(|m| m == me).unwrap_or(0);
        let start = (rank * partitions as usize / members.len().max(1)) as u16;
        let (after, before): (Vec<u16>, Vec<u16>) = free.iter().partition(|&&p| p >= start);
        plan.claim = after
            .into_iter()
            .chain(before)
            .take(want - mine.len())
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn quotas_add_up_and_differ_by_at_most_one() {
        for p in [1u16, 7, 16, 64] {
            for n in 1..20 {
                let members = names(n);
                let q: Vec<usize> = members.iter().map(|m| quota(p, &members, m)).collect();
                assert_eq!(q.iter().sum::<usize>(), p as usize, "P={p} N={n}");
                assert!(q.iter().max().unwrap() - q.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn a_member_over_quota_gives_back_its_highest() {
        let members = names(2);
        let mine: BTreeSet<u16> = (0..16).collect();
        let p = plan(16, &members, "m0", &mine, &BTreeSet::new());
        assert_eq!(p.give_back, (8..16).rev().collect::<Vec<_>>());
        assert!(p.claim.is_empty());
    }

    #[test]
    fn a_member_at_quota_does_nothing() {
        let members = names(3);
        let mine: BTreeSet<u16> = (0..6).collect();
        let free: BTreeSet<u16> = (10..16).collect();
        assert_eq!(plan(16, &members, "m0", &mine, &free), Plan::default());
    }

    /// Runs members' plans in turn, one claim or give-back at a time (as leases allow), until
    /// nothing changes: it converges, every partition is owned once, and nobody owns more than
    /// `ceil(P / N)`.
    fn settle(p: u16, members: &BTreeSet<String>, owners: &mut BTreeMap<u16, String>) -> usize {
        for round in 0..1000 {
            let mut moved = false;
            for m in members {
                let mine: BTreeSet<u16> = owners
                    .iter()
                    .filter(|(_, o)| *o == m)
                    .map(|(p, _)| *p)
                    .collect();
                let free: BTreeSet<u16> = (0..p).filter(|x| !owners.contains_key(x)).collect();
                let plan = plan(p, members, m, &mine, &free);
                for g in plan.give_back {
                    owners.remove(&g);
                    moved = true;
                }
                if let Some(&c) = plan.claim.first() {
                    owners.insert(c, m.clone());
                    moved = true;
                }
            }
            if !moved {
                return round;
            }
        }
        panic!("no convergence");
    }

    proptest! {
        #[test]
        fn plans_converge_to_a_balanced_exclusive_assignment(
            p in 1u16..64,
            n in 1usize..12,
            joined in 0usize..4,
            seed in proptest::collection::vec(0usize..16, 64),
        ) {
            // Start from an arbitrary (possibly unbalanced) assignment among the first members,
            // then let `joined` more members arrive.
            let first = names(n);
            let mut owners: BTreeMap<u16, String> = (0..p)
                .filter_map(|x| {
                    let pick = seed[x as usize % seed.len()];
                    (pick < n + 4).then(|| (x, first.iter().nth(pick % n).unwrap().clone()))
                })
                .collect();
            settle(p, &first, &mut owners);
            let all = names(n + joined);
            settle(p, &all, &mut owners);
            prop_assert_eq!(owners.len(), p as usize);
            let ceil = (p as usize).div_ceil(all.len());
            for m in &all {
                let count = owners.values().filter(|o| *o == m).count();
                prop_assert!(count <= ceil, "{} owns {} > {}", m, count, ceil);
                prop_assert_eq!(count, quota(p, &all, m));
            }
        }
    }
}
