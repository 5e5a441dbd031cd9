//! The node transport between two nodes on real loopback TCP: a snapshot larger than a
//! frame travels in pieces and arrives whole, in order with the messages around it; a
//! message to a node that is down is reported lost; notices reach the peer's server in
//! the order sent, and none while the peer is cut off.

use chorus_replication::transport::{Cuts, Handlers, Membership, Transport};
use raft::eraftpb::{Message, MessageType};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    chorus_replication::engine_env::free_loopback_addrs(n, 1)
}

type Got = Rc<RefCell<Vec<(u64, u64, Message)>>>;

type Noticed = Rc<RefCell<Vec<(u64, Vec<u8>)>>>;

fn node(me: u64, nodes: &BTreeMap<u64, SocketAddr>, got: Got, lost: Got) -> Rc<Transport> {
    node_noticing(me, nodes, got, lost, Noticed::default(), Cuts::default())
}

fn node_noticing(
    me: u64,
    nodes: &BTreeMap<u64, SocketAddr>,
    got: Got,
    lost: Got,
    noticed: Noticed,
    cuts: Cuts,
) -> Rc<Transport> {
    let listener = glommio::net::TcpListener::bind(nodes[&me]).unwrap();
    Transport::start_with_cuts(
        Membership {
            me,
            nodes: nodes.clone(),
            cluster: None,
        },
        listener,
        Handlers {
            deliver: Box::new(move |from, group, m| got.borrow_mut().push((from, group, m))),
            on_lost: Box::new(move |peer, msgs| {
                lost.borrow_mut()
                    .extend(msgs.into_iter().map(|(g, m)| (peer, g, m)))
            }),
            serve: None,
            call: None,
            notice: Some(Box::new(move |from, n| {
                noticed.borrow_mut().push((from, n))
            })),
        },
        cuts,
    )
}

/// A node that keeps only the notices it receives.
fn noticing(me: u64, nodes: &BTreeMap<u64, SocketAddr>, noticed: Noticed) -> Rc<Transport> {
    node_noticing(
        me,
        nodes,
        Got::default(),
        Got::default(),
        noticed,
        Cuts::default(),
    )
}

/// Runs `test` on an executor of its own, given `n` nodes' loopback addresses (IDs from 1).
fn on_loopback<F, Fut>(n: usize, test: F)
where
    F: FnOnce(BTreeMap<u64, SocketAddr>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move { test((1..).zip(free_addrs(n)).collect()).await });
}

fn heartbeat(from: u64, to: u64, commit: u64) -> Message {
    Message {
        msg_type: MessageType::MsgHeartbeat,
        from,
        to,
        term: 3,
        commit,
        ..Message::default()
    }
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_snapshot_larger_than_a_frame_arrives_whole_and_in_order() {
    on_loopback(3, |nodes| async move {
        let (got1, lost1): (Got, Got) = Default::default();
        let (got2, lost2): (Got, Got) = Default::default();
        let one = node(1, &nodes, got1, lost1.clone());
        let two = node(2, &nodes, got2.clone(), lost2);
        // 40 MB of snapshot: more than two frames' worth, ten pieces.
        let mut snap = Message {
            msg_type: MessageType::MsgSnapshot,
            from: 1,
            to: 2,
            term: 3,
            ..Message::default()
        };
        let data: Vec<u8> = (0..40_000_000u32).map(|i| (i % 251) as u8).collect();
        snap.mut_snapshot().data = data.clone().into();
        snap.mut_snapshot().mut_metadata().index = 1_000;
        one.send(5, heartbeat(1, 2, 1));
        one.send(5, snap);
        one.send(5, heartbeat(1, 2, 2));
        until("three messages at node 2", || got2.borrow().len() == 3).await;
        let got = got2.borrow().clone();
        let kinds: Vec<MessageType> = got.iter().map(|(_, _, m)| m.get_msg_type()).collect();
        assert_eq!(
            kinds,
            [
                MessageType::MsgHeartbeat,
                MessageType::MsgSnapshot,
                MessageType::MsgHeartbeat
            ]
        );
        assert!(got.iter().all(|(from, group, _)| (*from, *group) == (1, 5)));
        let s = got[1].2.get_snapshot();
        assert_eq!(s.get_metadata().index, 1_000);
        assert!(s.data[..] == data[..], "the snapshot's bytes arrive intact");
        assert_eq!((got[0].2.commit, got[2].2.commit), (1, 2));
        // Node 3 never started: what is sent to it is reported lost.
        one.send(5, heartbeat(1, 3, 9));
        until("the message to node 3 reported lost", || {
            lost1
                .borrow()
                .iter()
                .any(|(peer, _, m)| *peer == 3 && m.commit == 9)
        })
        .await;
        one.stop();
        two.stop();
    });
}

#[test]
fn notices_reach_the_peer_in_order_and_none_while_it_is_cut_off() {
    on_loopback(2, |nodes| async move {
        let noticed = Noticed::default();
        let cuts = Cuts::default();
        let one = node_noticing(
            1,
            &nodes,
            Got::default(),
            Got::default(),
            Noticed::default(),
            cuts.clone(),
        );
        let two = noticing(2, &nodes, noticed.clone());
        for i in 0..100u32 {
            one.notify(2, i.to_le_bytes().to_vec());
        }
        until("100 notices at node 2", || noticed.borrow().len() == 100).await;
        let got: Vec<u32> = noticed
            .borrow()
            .iter()
            .map(|(from, n)| {
                assert_eq!(*from, 1);
                u32::from_le_bytes(n[..].try_into().unwrap())
            })
            .collect();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        // Cut off from node 2, node 1 sends nothing; mended, it sends again.
        cuts.set(2, true);
        one.notify(2, b"lost".to_vec());
        one.send(5, heartbeat(1, 2, 1));
        glommio::timer::sleep(Duration::from_millis(200)).await;
        cuts.set(2, false);
        one.notify(2, b"after".to_vec());
        until("the notice after the cut", || noticed.borrow().len() == 101).await;
        assert_eq!(noticed.borrow()[100].1, b"after");
        one.stop();
        two.stop();
    });
}

// A notice queued while its peer cannot be reached waits for the connection (a failed
// login counted on one node must reach the others after a reconnection, not vanish with
// the failed connect), and arrives once the peer is up, in order with the ones after it.
#[test]
fn a_notice_waits_for_a_peer_that_is_not_up_yet() {
    on_loopback(2, |nodes| async move {
        let one = node(1, &nodes, Got::default(), Got::default());
        one.notify(2, b"early".to_vec());
        // Node 1's first connects fail meanwhile (its backoff doubles from 50 ms).
        glommio::timer::sleep(Duration::from_millis(400)).await;
        let noticed = Noticed::default();
        let two = noticing(2, &nodes, noticed.clone());
        one.notify(2, b"later".to_vec());
        until("both notices at node 2", || noticed.borrow().len() == 2).await;
        let got: Vec<Vec<u8>> = noticed.borrow().iter().map(|(_, n)| n.clone()).collect();
        assert_eq!(got, [b"early".to_vec(), b"later".to_vec()]);
        one.stop();
        two.stop();
    });
}

// A peer that restarted closed the connection its predecessor took; the first notice sent
// after it, on a connection left quiet, reaches the new peer (written into the closed
// connection, it would have vanished without an error).
#[test]
fn a_notice_after_the_peer_restarted_reaches_it() {
    on_loopback(2, |nodes| async move {
        let start_two = |noticed: Noticed| noticing(2, &nodes, noticed);
        let one = node(1, &nodes, Got::default(), Got::default());
        let before = Noticed::default();
        let two = start_two(before.clone());
        one.notify(2, b"first".to_vec());
        until("the first notice", || before.borrow().len() == 1).await;
        two.stop_and_close().await;
        drop(two);
        let after = Noticed::default();
        let two = start_two(after.clone());
        glommio::timer::sleep(Duration::from_millis(500)).await;
        one.notify(2, b"second".to_vec());
        until("the notice after the restart", || after.borrow().len() == 1).await;
        assert_eq!(after.borrow()[0].1, b"second");
        one.stop();
        two.stop();
    });
}
