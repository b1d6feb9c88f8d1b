//! In which order, and how many at once: paths sorted references-first, and the `jobs`
//! compression slots handed out (one to the largest NAR not yet started, the others
//! references-first).

use super::*;

/// Give out the `jobs` slots for compressing and uploading NARs. One slot goes to the largest
/// NAR not yet started, the others to paths in topological order (references first). The
/// large NARs are then under way from the start, so a push does not end with one core
/// compressing a large NAR alone while the other idles; and small references keep being
/// published one after another meanwhile, so a push that is interrupted still gets somewhere
/// (all slots largest-first would start the same large NARs again after every restart).
pub(super) fn hand_out_slots(
    to_push: &BTreeMap<StorePath, Arc<PathInfo>>,
    topological: Vec<StorePath>,
    senders: HashMap<StorePath, oneshot::Sender<OwnedSemaphorePermit>>,
    jobs: usize,
) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
    let mut largest: Vec<(u64, StorePath)> = to_push
        .values()
        .map(|i| (i.nar_size, i.path.clone()))
        .collect();
    largest.sort_by(|a, b| b.cmp(a));
    let largest: Vec<StorePath> = largest.into_iter().map(|(_, p)| p).collect();
    let unclaimed = Arc::new(std::sync::Mutex::new(senders));
    let (big, rest) = if jobs >= 2 {
        (1, jobs - 1)
    } else {
        (0, jobs.max(1))
    };
    let big = dispatch(largest, unclaimed.clone(), big);
    let rest = dispatch(topological, unclaimed, rest);
    async move {
        futures::join!(big, rest);
    }
}

/// Hand `slots` permits to the paths of `order` that nobody has claimed yet, one at a time.
pub(super) async fn dispatch(
    order: Vec<StorePath>,
    unclaimed: Arc<std::sync::Mutex<HashMap<StorePath, oneshot::Sender<OwnedSemaphorePermit>>>>,
    slots: usize,
) {
    if slots == 0 {
        return;
    }
    let slots = Arc::new(Semaphore::new(slots));
    for path in order {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let claimed = unclaimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&path);
        if let Some(tx) = claimed {
            // A path that has already failed has dropped its receiver; the permit comes back.
            let _ = tx.send(permit);
        }
    }
}

/// `paths` ordered so that every path comes after its references (within the set).
pub(super) fn topological(paths: &BTreeMap<StorePath, Arc<PathInfo>>) -> Vec<StorePath> {
    let mut indegree: HashMap<&StorePath, usize> = HashMap::new();
    let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for (p, info) in paths {
        let deps = info
            .references
            .iter()
            .filter(|r| *r != p && paths.contains_key(*r));
        let mut n = 0;
        for r in deps {
            referrers.entry(r).or_default().push(p);
            n += 1;
        }
        indegree.insert(p, n);
    }
    let mut ready: Vec<&StorePath> = indegree
        .iter()
        .filter(|&(_, &n)| n == 0)
        .map(|(p, _)| *p)
        .collect();
    ready.sort();
    let mut order = Vec::with_capacity(paths.len());
    while let Some(p) = ready.pop() {
        order.push(p.clone());
        for &q in referrers.get(p).map(Vec::as_slice).unwrap_or(&[]) {
            let n = indegree.get_mut(q).expect("known");
            *n -= 1;
            if *n == 0 {
                ready.push(q);
            }
        }
    }
    // Nix store closures are acyclic; should one not be, publish the rest in any order rather
    // than lose it (its narinfos then wait on nothing that cannot come).
    if order.len() < paths.len() {
        let placed: HashSet<StorePath> = order.iter().cloned().collect();
        order.extend(paths.keys().filter(|p| !placed.contains(*p)).cloned());
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Sha256;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", "0".repeat(31) + &name[..1])).unwrap()
    }

    fn info(p: &StorePath, nar_size: u64, refs: &[&StorePath]) -> Arc<PathInfo> {
        Arc::new(PathInfo {
            path: p.clone(),
            nar_hash: Sha256([0; 32]),
            nar_size,
            references: refs.iter().map(|r| (*r).clone()).collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        })
    }

    #[test]
    fn references_come_first() {
        let mk = |p: &StorePath, refs: &[&StorePath]| info(p, 1, refs);
        let (a, b, c, d) = (sp("a"), sp("b"), sp("c"), sp("d"));
        let m: BTreeMap<_, _> = [
            (a.clone(), mk(&a, &[&b, &c, &a])),
            (b.clone(), mk(&b, &[&c])),
            (c.clone(), mk(&c, &[])),
            (d.clone(), mk(&d, &[&a])),
        ]
        .into_iter()
        .collect();
        let order = topological(&m);
        let pos = |p: &StorePath| order.iter().position(|x| x == p).unwrap();
        assert_eq!(order.len(), 4);
        assert!(pos(&c) < pos(&b) && pos(&b) < pos(&a) && pos(&a) < pos(&d));
    }

    #[test]
    fn one_slot_for_the_largest_nar_the_others_references_first() {
        let mk = info;
        // c and b are small leaves, a is small and refers to them, d is large and refers to a.
        let (a, b, c, d) = (sp("a"), sp("b"), sp("c"), sp("d"));
        let m: BTreeMap<_, _> = [
            (a.clone(), mk(&a, 10, &[&b, &c])),
            (b.clone(), mk(&b, 20, &[&c])),
            (c.clone(), mk(&c, 30, &[])),
            (d.clone(), mk(&d, 1000, &[&a])),
        ]
        .into_iter()
        .collect();
        let order = topological(&m);
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for p in m.keys() {
            let (tx, rx) = oneshot::channel();
            senders.insert(p.clone(), tx);
            receivers.insert(p.clone(), rx);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let dispatcher = tokio::spawn(hand_out_slots(&m, order, senders, 2));
            let mut take = |p: &StorePath| receivers.remove(p).unwrap();
            // The large NAR (last in topological order) and the first leaf start at once.
            let d_slot = take(&d).await.expect("d gets the large-NAR slot");
            let c_slot = take(&c).await.expect("c gets the other slot");
            let mut b_rx = take(&b);
            tokio::task::yield_now().await;
            assert!(b_rx.try_recv().is_err(), "no third slot while two are held");
            // Freed slots go on in topological order: b, then a.
            drop(c_slot);
            let b_slot = b_rx.await.expect("b next");
            drop(d_slot);
            drop(b_slot);
            let _a_slot = take(&a).await.expect("a last");
            dispatcher.await.unwrap();
        });
    }
}
