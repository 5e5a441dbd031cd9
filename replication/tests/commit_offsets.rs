//! Each proposer of a replicated event log learns where its batch went from its own
//! proposal's answer, however many commits one turn of the group applies. (Its own test
//! binary: a burst of 10,000 commits takes the CPU, and the three-node tests beside it
//! would see elections.)

mod common;

use chorus_replication::transport::Membership;
use chorus_replication::NodeConfig;
use common::{batch, free_addrs, MINUTE};
use raft::StateRole;
use std::collections::BTreeMap;
use std::time::Duration;

/// Commits in one burst, far more than one turn of the group applies at a time.
const BURST: u64 = 10_000;

/// Each proposer learns where its batch went from its own answer: a burst of commits is
/// applied thousands at a time before any proposer runs again, and every one of them is
/// answered with its batch's offsets (a side table of the last few thousand ranges
/// forgot the oldest here).
#[test]
fn a_burst_of_commits_each_learns_its_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_addrs(1)[0];
    let dir = tmp.path().to_path_buf();
    let (answers, records) = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async move {
            let listener = common::bind(addr).await;
            let config = NodeConfig::new(Membership::new(1, BTreeMap::from([(1, addr)])), 1);
            let (node, rlog) = common::event_log_node(config, dir, listener).await;
            let start = std::time::Instant::now();
            while node.status()[&0].role != StateRole::Leader {
                assert!(start.elapsed() < MINUTE, "the node never led its group");
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let commits: Vec<_> = (0..BURST)
                .map(|k| {
                    let rlog = rlog.clone();
                    glommio::spawn_local(async move { common::commit_batch(&rlog, k).await })
                })
                .collect();
            let answers = futures::future::join_all(commits).await;
            node.stop(false).await.expect("the group's storage");
            let records: BTreeMap<u64, Vec<u8>> =
                common::records(rlog.log()).await.into_iter().collect();
            (answers, records)
        });
    let mut told = 0;
    for (k, answer) in (0..BURST).zip(answers) {
        let range = answer.unwrap_or_else(|e| panic!("batch {k} was not committed: {e}"));
        let expected = batch(k);
        assert_eq!(range.end - range.start, expected.len() as u64, "batch {k}");
        for (o, payload) in range.zip(&expected) {
            assert_eq!(records.get(&o), Some(payload), "batch {k} where told");
        }
        told += expected.len();
    }
    assert_eq!(
        told,
        records.len(),
        "the log holds the committed batches only"
    );
}
