//! One `ProduceStream` call to one node: many requests in flight, responses matched by
//! correlation id. In a cluster a producer holds one per node, each carrying the batches of the
//! partitions that node leads.
//!
//! [`Connection::submit`] registers a reply channel under the request's correlation id and
//! queues the request on the call's request stream, without waiting, so requests go out in the
//! order they were submitted. A task reads the response stream and completes each reply. A
//! response with `error` set fails only its request; when the stream itself ends or fails, every
//! pending request fails with that error (transient when the broker went away, so the producer
//! retries on a fresh stream) and the connection is closed for good.
//!
//! The task holds only the pending map, not the request sender: dropping the [`Connection`]
//! ends the request stream, the broker ends the call, and the task finishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use syncline_proto::v1::{ProduceRequest, ProduceResponse};
use tokio::sync::{mpsc, oneshot};
use tonic::Code;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::routing::Node;

type Reply = oneshot::Sender<Result<ProduceResponse>>;

#[derive(Debug, Default)]
struct Pending {
    /// Set once the stream has ended; later submissions fail with it.
    closed: Option<Error>,
    replies: HashMap<u64, Reply>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    /// The lock, even if a thread panicked while holding it (the map stays consistent: every
    /// update is a single insert or remove).
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn complete(&self, response: ProduceResponse) -> bool {
        let reply = self.lock().replies.remove(&response.correlation_id);
        match reply {
            Some(reply) => {
                // The waiter may have given up (delivery timeout); nothing to do then.
                let _ = reply.send(Ok(response));
                true
            }
            None => false,
        }
    }

    fn close(&self, error: Error) {
        let replies = {
            let mut pending = self.lock();
            pending.closed = Some(error.clone());
            std::mem::take(&mut pending.replies)
        };
        for (_, reply) in replies {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// A `ProduceStream` call; see the module doc.
#[derive(Debug)]
pub struct Connection {
    requests: mpsc::UnboundedSender<ProduceRequest>,
    shared: Arc<Shared>,
    /// The node's `host:port`.
    address: Arc<str>,
}

/// An answer awaited from a [`Connection`]. Dropping it forgets the request, so a response that
/// arrives after its waiter gave up is discarded.
#[derive(Debug)]
pub struct Attempt {
    correlation_id: u64,
    /// The node it went to.
    address: Arc<str>,
    shared: Arc<Shared>,
    reply: oneshot::Receiver<Result<ProduceResponse>>,
}

impl Attempt {
    /// Waits for the response. A per-request error becomes [`Error::Broker`]; a broken stream
    /// becomes the stream's error.
    pub async fn response(&mut self) -> Result<ProduceResponse> {
        match (&mut self.reply).await {
            Ok(Ok(response)) => match &response.error {
                Some(status) => Err(Error::Broker {
                    code: Code::from_i32(status.code),
                    message: status.message.clone(),
                }),
                None => Ok(response),
            },
            Ok(Err(error)) => Err(error),
            Err(_) => Err(stream_gone(&self.address)),
        }
    }

    /// The node the request went to.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.shared.lock().replies.remove(&self.correlation_id);
    }
}

fn stream_gone(address: &str) -> Error {
    Error::Unreachable {
        address: address.to_owned(),
        reason: "the produce stream ended".to_owned(),
    }
}

impl Connection {
    /// Starts a `ProduceStream` call on `node`'s connection. Returns at once; the call is set
    /// up in the background and requests submitted meanwhile wait in its queue.
    pub fn open(client: &Client, node: Node) -> Connection {
        let (requests, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let address = node.address.clone();
        tokio::spawn(run(client.clone(), node, shared.clone(), receiver));
        Connection {
            requests,
            shared,
            address,
        }
    }

    /// Whether the stream has ended; a closed connection fails every submission.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some() || self.requests.is_closed()
    }

    /// Queues `request` and returns the attempt to await its response. Fails at once when the
    /// stream has ended.
    pub fn submit(&self, request: ProduceRequest) -> Result<Attempt> {
        let correlation_id = request.correlation_id;
        let (reply, receiver) = oneshot::channel();
        {
            let mut pending = self.shared.lock();
            if let Some(error) = &pending.closed {
                return Err(error.clone());
            }
            pending.replies.insert(correlation_id, reply);
        }
        if self.requests.send(request).is_err() {
            self.shared.lock().replies.remove(&correlation_id);
            return Err(stream_gone(&self.address));
        }
        Ok(Attempt {
            correlation_id,
            address: self.address.clone(),
            shared: self.shared.clone(),
            reply: receiver,
        })
    }
}

async fn run(
    client: Client,
    node: Node,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<ProduceRequest>,
) {
    let address = &node.address;
    let opened = crate::wire_call::open_produce_stream(
        node.raw.clone(),
        requests,
        client.config().message_bytes_max,
    )
    .await;
    let error = match opened {
        Err(status) => client.stream_error_any_partition(address, status),
        Ok(mut responses) => loop {
            match responses.message().await {
                Ok(Some(response)) => {
                    let correlation_id = response.correlation_id;
                    if !shared.complete(response) {
                        tracing::debug!(
                            correlation_id,
                            "produce response for a request nobody waits for"
                        );
                    }
                }
                Ok(None) => break stream_gone(address),
                Err(status) => break client.stream_error_any_partition(address, status),
            }
        },
    };
    let pending = shared.lock().replies.len();
    if pending > 0 {
        tracing::warn!(
            broker = %address,
            pending,
            %error,
            "produce stream ended with requests in flight"
        );
    } else {
        tracing::debug!(broker = %address, %error, "produce stream ended");
    }
    shared.close(error);
}
