//! Running a session's [`Call`]s on the engine: the one part of a session that awaits, shared
//! by every driver. Each call becomes an owned future, so a driver can poll it beside its
//! socket and the subscription's frames.

use super::{Acked, Answer, Call, ReadAck, SessionCore};
use crate::api::Relay;
use crate::error::ApiError;
use crate::protocol::Command;
use bytes::Bytes;
use chorus_engine::ids::UserId;
use chorus_engine::view::MessageView;
use chorus_engine::{Engine, EngineError, Subscription, Unavailable};
use std::task::{Context, Poll};

pub use chorus_engine::SubscriptionControl;

/// Makes `call` as `user` and answers it. `control` starts and resumes the session's
/// subscription; on a cluster node, `relay` passes a command this node does not lead to
/// the node that does.
pub async fn run_call(
    engine: Engine,
    control: SubscriptionControl,
    relay: Option<Relay>,
    user: UserId,
    call: Call,
) -> Answer {
    match call {
        Call::Start { since } => match control.start(since).await {
            Ok(()) => Answer::Started(true),
            Err(e) => {
                tracing::warn!(error = %e, %user, "starting a subscription failed");
                Answer::Started(false)
            }
        },
        Call::Resume { reference, since } => Answer::Resumed {
            reference,
            result: control.resume(since).await.map_err(ApiError::from),
        },
        Call::Typing { reference, channel } => {
            let result = engine.typing(user, channel).await.map_err(ApiError::from);
            if let (Ok(()), Some(relay)) = (&result, &relay) {
                relay.typing(user, channel);
            }
            Answer::Typing { reference, result }
        }
        Call::PresenceSub {
            reference,
            op,
            users,
        } => Answer::PresenceSub {
            reference,
            result: control
                .watch_presence(op, users)
                .await
                .map_err(ApiError::from),
        },
        Call::Activity { active } => {
            if let Err(e) = control.report_activity(active).await {
                tracing::debug!(error = %e, %user, "reporting activity failed");
            }
            Answer::Activity
        }
        Call::AckToDevice {
            reference,
            device,
            upto,
        } => {
            let acked = engine.ack_to_device(user, &device, upto).await;
            // On a cluster node that does not lead the directory, the leader takes it as
            // the read past `upto` that acknowledges over REST.
            let relayed = match (leader_of(&acked), relay) {
                (Some(leader), Some(relay)) => {
                    let path = "/api/v1/e2ee/to-device".to_owned();
                    let call =
                        crate::api::AsRest(hyper::Method::GET, path, serde_json::Value::Null);
                    let query = Some(format!("after={upto}&limit=1"));
                    relay
                        .rest_on_device(leader, user, Some(device), call, query)
                        .await
                }
                _ => None,
            };
            let result = match relayed {
                Some(answer) => answer.map(|_| ()),
                None => acked.map_err(ApiError::from),
            };
            Answer::AckedToDevice { reference, result }
        }
        Call::MarkRead {
            reference,
            channel,
            seq,
        } => {
            let marked = engine.mark_read(user, channel, seq).await;
            let relayed = match (leader_of(&marked), relay) {
                (Some(leader), Some(relay)) => {
                    let path = format!("/api/v1/channels/{channel}/read");
                    let body = serde_json::json!({ "seq": seq });
                    let call = crate::api::AsRest(hyper::Method::POST, path, body);
                    relay.rest(leader, user, call).await
                }
                _ => None,
            };
            let result = match relayed {
                Some(answer) => answer.map(|body| ReadAck::Relayed(body["read"].clone())),
                None => marked.map(ReadAck::Here).map_err(ApiError::from),
            };
            Answer::Read { reference, result }
        }
        Call::Command { reference, command } => Answer::Command {
            reference,
            result: command_result(&engine, relay, user, command).await,
        },
    }
}

async fn command_result(
    engine: &Engine,
    relay: Option<Relay>,
    user: UserId,
    command: Command,
) -> Result<Option<Acked>, ApiError> {
    // The command as the leader would take it, made before the engine takes the command.
    let relayed = relay.map(|r| (Relay::rest_of(&command), r));
    let result = match command {
        Command::Send {
            channel,
            content,
            client_msg_id,
            thread,
            files,
        } => engine
            .post_content(
                user,
                channel,
                content,
                client_msg_id.as_deref(),
                thread,
                files,
            )
            .await
            .map(|(m, _)| Some(m)),
        Command::Edit { message, content } => (engine.edit_content(user, message, content))
            .await
            .map(Some),
        Command::Delete { message } => engine.delete(user, message).await.map(|()| None),
        Command::React {
            message,
            emoji,
            add,
        } => engine
            .react(user, message, &emoji, add)
            .await
            .map(|()| None),
    };
    if let (Some(leader), Some((call, relay))) = (leader_of(&result), relayed) {
        if let Some(answer) = relay.command(leader, user, call).await {
            return answer.map(|m| m.map(Acked::Relayed));
        }
    }
    result
        .map(|m: Option<MessageView>| m.map(Acked::Here))
        .map_err(ApiError::from)
}

/// The node that leads what `result` was refused for, if it was refused as not led here.
fn leader_of<T>(result: &Result<T, EngineError>) -> Option<u64> {
    match result {
        Err(EngineError::Unavailable(
            Unavailable::NotLeader {
                leader: Some(l), ..
            }
            | Unavailable::MetaNotLeader { leader: Some(l) },
        )) => Some(*l),
        _ => None,
    }
}

/// Moves the subscription's ready frames into the core, up to its room, and registers the
/// queue's waker when it is found empty; a cutoff is handed to the core. Returns whether
/// anything happened. `batch` is the caller's scratch space, left empty. The clock is read
/// only when frames were taken.
pub fn take_events(
    now: impl FnOnce() -> std::time::Instant,
    core: &mut SessionCore,
    sub: &mut Subscription,
    batch: &mut Vec<Bytes>,
    cx: &mut Context<'_>,
) -> bool {
    let room = core.event_room();
    if room == 0 {
        return false;
    }
    // Until the queue is found empty, which registers for its next wake-up: a take that
    // found frames but left room must register too, or a frame pushed later without waking
    // anyone (a presence window's end mark follows records pushed quietly) could wait for
    // an unrelated wake-up.
    let taken = loop {
        match sub.try_recv_batch(batch, room - batch.len()) {
            Ok(_) if batch.len() == room => break Ok(()),
            Ok(_) => match sub.receiver().poll_recv(cx) {
                Poll::Ready(Ok(frame)) => batch.push(frame),
                Poll::Ready(Err(cutoff)) => break Err(cutoff),
                Poll::Pending => break Ok(()),
            },
            Err(cutoff) => break Err(cutoff),
        }
    };
    let mut progressed = !batch.is_empty();
    if progressed {
        let now = now();
        for frame in batch.drain(..) {
            core.push_event(now, frame);
        }
    }
    if batch.capacity() > super::BATCH_FRAMES_MAX {
        batch.shrink_to(super::BATCH_FRAMES_MAX);
    }
    if let Err(cutoff) = taken {
        if matches!(cutoff, chorus_engine::queue::Cutoff::Overflow) {
            tracing::debug!(user = %core.user(), "slow client cut off");
        }
        core.handle_cutoff(cutoff);
        progressed = true;
    }
    progressed
}
