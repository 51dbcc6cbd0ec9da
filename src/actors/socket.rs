//! One upgraded WebSocket on its own TCP stream, with small buffers.
//!
//! After the handshake ([`crate::http::upgrade`]) a session owns its socket outright: nothing
//! of actix-http's HTTP/1 dispatcher (two 8 KiB buffers per connection) stays behind. Reading
//! allocates only while bytes are in flight, and an idle socket holds no buffer at all.
//!
//! Backpressure keeps the property the rooms rely on (see [`super::member`]): the actor is not
//! polled while its socket is backpressured. Past [`HIGH_WATERMARK`] unwritten bytes the actor
//! waits (`ctx.wait`, which holds back its inbox, its mailbox and its inbound frames) until
//! the kernel took the backlog down to [`LOW_WATERMARK`], so what a room counts as pending is
//! the backlog.
//!
//! The actor may also stop reading for a while ([`WsSocket::set_reading`]): a session whose
//! publishes in flight reach their cap, or whose history read is on the bus, reads no more
//! frames until it is answered, so a fast client is slowed by TCP backpressure. Deliveries go
//! on meanwhile.
//!
//! Closing queues the close frame and stops the actor at once, so the session leaves its
//! room, its presence and its slot even when the peer reads nothing (a slow consumer's 4008).
//! A task of its own (`finish`) then writes what is still queued, the close frame last (given
//! up when the peer takes nothing of it for the stall timeout), shuts the write side (the
//! server starts the TCP close, RFC 6455 §7.1.1), and lingers (`linger`), reading and
//! discarding until the peer closes too: closing with unread bytes in the kernel would send a
//! reset, which can destroy the close frame before the client reads it.
//!
//! Kept rather than actix-ws (which runs on actix-http's dispatcher and keeps its two 8 KiB
//! buffers per connection) or tokio-tungstenite (issue 20): measured with `confab-bench idle`
//! at 10,000 idle sessions, confab holds about 5.4 KB of resident memory per connection
//! against 12.5 KB for a bare tokio-tungstenite broadcast server in the same run
//! (docs/PERFORMANCE.md), and this socket's backpressure (the actor waits, so a room's counts
//! are the backlog) is what the slow-consumer rule is built on.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll, Waker};
use std::time::Duration;

use actix::prelude::*;
use actix_codec::Decoder;
use actix_http::ws::{self, CloseCode, CloseReason, Frame, OpCode, Parser, ProtocolError};
use bytes::{Buf, BytesMut};
use futures_util::Stream;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::close::Close;
use crate::metrics::Metrics;
use crate::wsframe::{Assembler, Inbound};

/// Unwritten bytes past which the actor waits for its socket.
pub const HIGH_WATERMARK: usize = 16 * 1024;
/// Unwritten bytes under which a waiting actor runs again.
pub const LOW_WATERMARK: usize = 4 * 1024;
/// What an empty outbox allocates for its first frame (see [`WsSocket::frame`]).
const FIRST_BUFFER: usize = LOW_WATERMARK;
/// A frame this small (a heartbeat's ping or pong) is not worth a [`FIRST_BUFFER`].
const SMALL_FRAME: usize = 64;
/// How much one read asks the kernel for.
const READ_CHUNK: usize = 2048;
/// Longest a closed connection lingers for the peer to close its side, once the close frame
/// is out.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What a socket's reader and writer share; single-threaded, like the actor that owns it.
struct Io {
    stream: TcpStream,
    out: RefCell<Outbox>,
    /// Longest the actor waits on a backlog the peer takes nothing of.
    stall: Duration,
    /// Asked while the actor waits on its backlog: true ends the wait at once (a room told
    /// the session to close; its close must not wait for a client that reads nothing).
    interrupt: RefCell<Option<Arc<dyn Interrupt>>>,
    /// The actor reads no frames for now; the reader's waker is kept to resume it.
    paused: Cell<bool>,
    reader: RefCell<Option<Waker>>,
}

/// What can cut a wait on the backlog short (see [`WsSocket::interrupt_with`]). A trait object
/// rather than a closure: the session's inbox is it, so every connection holds a pointer to
/// what it already has, not one more allocation.
pub trait Interrupt {
    /// Whether the wait should end; otherwise remembers `waker`, to wake when it should be
    /// asked again.
    fn interrupted(&self, waker: &Waker) -> bool;
}

#[derive(Default)]
struct Outbox {
    /// Encoded frames not yet taken by the kernel; unallocated when empty.
    buf: BytesMut,
    /// A close frame is queued: nothing more is written, and the actor stops once it is out.
    closing: bool,
    /// The actor waits for the backlog to shrink.
    draining: bool,
    /// The peer's end of stream was read: nothing to linger for.
    read_done: bool,
    /// The writer, parked while there is nothing to write or the socket is full (a close
    /// queued then must wake it).
    waker: Option<Waker>,
}

impl Io {
    /// Writes until the backlog is empty (ready), the socket is full (pending) or broken.
    fn poll_flush(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let mut out = self.out.borrow_mut();
        while !out.buf.is_empty() {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(&out.buf) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => out.buf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Frees the buffer: an idle connection keeps none.
        out.buf = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

/// A connection just upgraded: its stream, bytes read past the handshake, and the signal the
/// upgrade waits on.
pub struct Upgraded {
    pub stream: TcpStream,
    pub read: BytesMut,
    pub done: oneshot::Sender<()>,
}

/// The write side of one WebSocket, held by its actor.
pub struct WsSocket {
    io: Rc<Io>,
    /// Dropped with the actor: the upgrade's future waits for it, so the server counts the
    /// connection until the session ends.
    _done: oneshot::Sender<()>,
}

impl WsSocket {
    /// Starts reading and writing `stream` for the actor being created; `read` holds bytes the
    /// client sent right after its handshake. Inbound frames arrive as
    /// `Result<Frame, ProtocolError>` through the actor's `StreamHandler`. A peer that takes
    /// none of a full backlog for `stall` is dropped (the actor stops): while it waits on its
    /// socket the actor runs nothing else, not even its heartbeat.
    pub fn start<A>(
        conn: Upgraded,
        max_frame_bytes: usize,
        stall: Duration,
        ctx: &mut Context<A>,
    ) -> Self
    where
        A: Actor<Context = Context<A>> + StreamHandler<Result<Frame, ProtocolError>>,
    {
        let Upgraded { stream, read, done } = conn;
        let io = Rc::new(Io {
            stream,
            out: RefCell::new(Outbox::default()),
            stall,
            interrupt: RefCell::new(None),
            paused: Cell::new(false),
            reader: RefCell::new(None),
        });
        ctx.add_stream(Frames {
            io: Rc::clone(&io),
            buf: read,
            codec: ws::Codec::new().max_size(max_frame_bytes),
            done: false,
        });
        ctx.spawn(Writer { io: Rc::clone(&io) });
        Self { io, _done: done }
    }

    /// Lets a wait on the backlog be cut short: `interrupt` is asked with the actor's waker
    /// and ends the wait when it answers true. The actor then runs, and closes the socket.
    pub fn interrupt_with(&mut self, interrupt: Arc<dyn Interrupt>) {
        *self.io.interrupt.borrow_mut() = Some(interrupt);
    }

    /// Stops (false) or resumes (true) reading frames; frames already decoded in the batch at
    /// hand are still handed over.
    pub fn set_reading(&mut self, reading: bool) {
        if self.io.paused.get() != reading {
            return;
        }
        self.io.paused.set(!reading);
        if reading {
            if let Some(waker) = self.io.reader.borrow_mut().take() {
                waker.wake();
            }
        }
    }

    /// Whether a close frame is queued; inbound frames are ignored from then on.
    pub fn closing(&self) -> bool {
        self.io.out.borrow().closing
    }

    pub fn text<A>(&mut self, text: impl AsRef<[u8]>, ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.frame(text.as_ref(), OpCode::Text, ctx);
    }

    pub fn binary<A>(&mut self, data: impl AsRef<[u8]>, ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.frame(data.as_ref(), OpCode::Binary, ctx);
    }

    pub fn ping<A>(&mut self, data: &[u8], ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.frame(data, OpCode::Ping, ctx);
    }

    pub fn pong<A>(&mut self, data: &[u8], ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.frame(data, OpCode::Pong, ctx);
    }

    /// Queues the close frame; the actor stops once it is written.
    pub fn close(&mut self, reason: Option<CloseReason>) {
        let mut out = self.io.out.borrow_mut();
        if out.closing {
            return;
        }
        out.closing = true;
        Parser::write_close(&mut out.buf, reason, false);
        if let Some(waker) = out.waker.take() {
            waker.wake();
        }
    }

    /// Queues frames that are already encoded ([`crate::actors::member::Encoded`]), as they
    /// are.
    pub fn encoded<A>(&mut self, frames: &[u8], ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.queue(frames.len(), |buf| buf.extend_from_slice(frames), ctx);
    }

    fn frame<A>(&mut self, payload: &[u8], op: OpCode, ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.queue(
            payload.len() + 14,
            |buf| Parser::write_message(buf, payload, op, true, false),
            ctx,
        );
    }

    /// Queues what `write` appends (about `size` bytes), wakes the writer, and waits on the
    /// socket past [`HIGH_WATERMARK`].
    fn queue<A>(&mut self, size: usize, write: impl FnOnce(&mut BytesMut), ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        let mut out = self.io.out.borrow_mut();
        if out.closing {
            return;
        }
        if out.buf.capacity() == 0 {
            // An idle socket holds no buffer; a batch of frames then grew it by doubling, one
            // realloc per step (a few per batch in a busy room). One block that holds a
            // typical batch, freed again once it is written; a ping or pong of an idle
            // connection takes only its own few bytes.
            out.buf.reserve(if size <= SMALL_FRAME {
                size
            } else {
                FIRST_BUFFER.max(size)
            });
        }
        write(&mut out.buf);
        // The writer runs after this handler, in this poll of the actor or (when it was polled
        // before, as it is before the session's deliveries) in the next one, which this wake
        // schedules: frames handled together (a batch of deliveries) go out in one write.
        if let Some(waker) = out.waker.take() {
            waker.wake();
        }
        if out.buf.len() > HIGH_WATERMARK && !out.draining {
            out.draining = true;
            drop(out);
            ctx.wait(Drain {
                io: Rc::clone(&self.io),
                left: usize::MAX,
                progress: tokio::time::Instant::now(),
                deadline: None,
            });
        }
    }
}

/// Fails the connection: a close frame with `why`'s code and reason, then stop once it is
/// written.
pub fn fail(socket: &mut WsSocket, why: Close) {
    socket.close(Some(CloseReason {
        code: CloseCode::from(why.code()),
        description: Some(why.reason().to_owned()),
    }));
}

/// Feeds one frame through the assembler and answers what the protocol itself requires
/// (pongs, close handshakes, failures). Returns complete text and binary messages.
pub fn handle_frame<A>(
    frames: &mut Assembler,
    socket: &mut WsSocket,
    item: Result<Frame, ProtocolError>,
    ctx: &mut Context<A>,
    metrics: Option<&Metrics>,
) -> Option<Inbound>
where
    A: Actor<Context = Context<A>>,
{
    if socket.closing() {
        return None;
    }
    match frames.push_frame(item) {
        Ok(Inbound::Ping(data)) => socket.pong(&data, ctx),
        Ok(Inbound::Pong | Inbound::Partial) => {}
        // Answer the close handshake with the peer's code, as RFC 6455 §5.5.1 asks.
        Ok(Inbound::Close(reason)) => socket.close(reason),
        Ok(message) => return Some(message),
        Err(failure) => {
            let why = Close::Frame(failure);
            if let Some(m) = metrics {
                m.bad_frame(why.code());
            }
            fail(socket, why)
        }
    }
    None
}

/// The inbound stream ended (the peer hung up or the stream broke): stop, unless a close
/// frame is still on its way out, whose writer stops the actor.
pub fn finished<A>(socket: &WsSocket, ctx: &mut Context<A>)
where
    A: Actor<Context = Context<A>>,
{
    if !socket.closing() {
        ctx.stop();
    }
}

/// Inbound frames, decoded from a buffer that exists only while bytes are in flight.
struct Frames {
    io: Rc<Io>,
    buf: BytesMut,
    codec: ws::Codec,
    done: bool,
}

impl Frames {
    /// Nothing more can be read: the peer's end of stream or a broken socket.
    fn end(&mut self) {
        self.done = true;
        self.io.out.borrow_mut().read_done = true;
    }
}

impl Stream for Frames {
    type Item = Result<Frame, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if this.io.paused.get() {
                *this.io.reader.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !this.buf.is_empty() {
                match this.codec.decode(&mut this.buf) {
                    Ok(Some(frame)) => {
                        if this.buf.is_empty() {
                            this.buf = BytesMut::new();
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            // A broken socket ends the stream like the peer's end of stream: no close frame
            // can reach the peer, and the codec's errors stay the only errors in it.
            if ready!(this.io.stream.poll_read_ready(cx)).is_err() {
                this.end();
                return Poll::Ready(None);
            }
            this.buf.reserve(READ_CHUNK);
            match this.io.stream.try_read_buf(&mut this.buf) {
                Ok(0) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.buf.is_empty() {
                        this.buf = BytesMut::new();
                    }
                }
                Err(_) => {
                    this.end();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// Writes queued frames for the life of the actor; stops it when the socket breaks or once a
/// close frame is queued (the rest is written by [`finish`]).
struct Writer {
    io: Rc<Io>,
}

impl<A> ActorFuture<A> for Writer
where
    A: Actor<Context = Context<A>>,
{
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        _: &mut A,
        ctx: &mut Context<A>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        if this.io.out.borrow().closing {
            // The actor ends now, so its room, presence and memory go at once, even when the
            // peer reads nothing (a slow consumer's 4008 used to wait behind its backlog).
            // What is still unwritten, at most a socket's worth and the close frame, goes out
            // from a task of its own.
            actix::spawn(finish(Rc::clone(&this.io)));
            ctx.stop();
            return Poll::Ready(());
        }
        match this.io.poll_flush(task) {
            Poll::Ready(Ok(())) => {
                this.io.out.borrow_mut().waker = Some(task.waker().clone());
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                log::debug!("websocket write failed: {e}");
                ctx.stop();
                Poll::Ready(())
            }
            Poll::Pending => {
                // Waiting on a full socket: a close queued meanwhile must still wake this
                // writer, or a peer that reads nothing keeps the session until its stall
                // timeout.
                let mut out = this.io.out.borrow_mut();
                if !out
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(task.waker()))
                {
                    out.waker = Some(task.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// Writes what a closed connection still has queued, the close frame last, then shuts the
/// write side (the server starts the TCP close, RFC 6455 §7.1.1) and lingers for the peer's
/// close. A peer that takes nothing of it for the stall timeout is dropped. What it holds is
/// the socket and at most a socket's worth of bytes (the actor waits past
/// [`HIGH_WATERMARK`]) plus the frame that crossed it.
async fn finish(conn: Rc<Io>) {
    let flushed = async {
        let mut left = usize::MAX;
        loop {
            let wrote =
                tokio::time::timeout(conn.stall, std::future::poll_fn(|cx| conn.poll_flush(cx)))
                    .await;
            match wrote {
                Ok(result) => return result.is_ok(),
                // Progress since the last look: wait another stall.
                Err(_) if conn.out.borrow().buf.len() < left => {
                    left = conn.out.borrow().buf.len();
                }
                Err(_) => return false,
            }
        }
    };
    if !flushed.await {
        return;
    }
    let _ = socket2::SockRef::from(&conn.stream).shutdown(std::net::Shutdown::Write);
    if !conn.out.borrow().read_done {
        linger(conn).await;
    }
}

/// Keeps a closed connection's socket, reading and discarding, until the peer closes its
/// side or [`CLOSE_GRACE`] passed; then drops it. Without this, bytes the peer sent after our
/// close frame would make the kernel answer with a reset.
async fn linger(conn: Rc<Io>) {
    let mut scratch = [0u8; 512];
    let read_to_end = async {
        loop {
            if conn.stream.readable().await.is_err() {
                return;
            }
            match conn.stream.try_read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, read_to_end).await;
}

/// Holds the actor back while its backlog is above the low watermark.
struct Drain {
    io: Rc<Io>,
    /// The smallest backlog seen: progress when it shrinks.
    left: usize,
    /// When the backlog last shrank.
    progress: tokio::time::Instant,
    /// The stall timer, made only when the socket stays full: most waits end at once, as the
    /// kernel takes the backlog on the first try.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<A> ActorFuture<A> for Drain
where
    A: Actor<Context = Context<A>>,
{
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        _: &mut A,
        ctx: &mut Context<A>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        if this
            .io
            .interrupt
            .borrow()
            .as_ref()
            .is_some_and(|interrupt| interrupt.interrupted(task.waker()))
        {
            this.io.out.borrow_mut().draining = false;
            return Poll::Ready(());
        }
        let flushed = this.io.poll_flush(task);
        let mut out = this.io.out.borrow_mut();
        match flushed {
            Poll::Pending if out.buf.len() >= LOW_WATERMARK => {
                if out.buf.len() < this.left {
                    this.left = out.buf.len();
                    this.progress = tokio::time::Instant::now();
                }
                loop {
                    let until = this.progress + this.io.stall;
                    let timer = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    if timer.as_mut().poll(task).is_pending() {
                        return Poll::Pending;
                    }
                    if timer.deadline() >= until {
                        break;
                    }
                    // The peer took some since the timer was set: wait from then.
                    timer.as_mut().reset(until);
                }
                log::info!(
                    "websocket peer took nothing of {} bytes for {:?}: dropped",
                    out.buf.len(),
                    this.io.stall
                );
                out.draining = false;
                drop(out);
                ctx.stop();
                Poll::Ready(())
            }
            Poll::Ready(Err(e)) => {
                log::debug!("websocket write failed: {e}");
                out.draining = false;
                drop(out);
                ctx.stop();
                Poll::Ready(())
            }
            _ => {
                out.draining = false;
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// How long the test actors wait on a peer that reads nothing.
    const STALL: Duration = Duration::from_secs(5);

    /// Echoes text through the same helpers the session and `/echo` use.
    struct Echoer {
        socket: WsSocket,
        frames: Assembler,
    }

    impl Actor for Echoer {
        type Context = Context<Self>;
    }

    impl StreamHandler<Result<Frame, ProtocolError>> for Echoer {
        fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
            if let Some(Inbound::Text(text)) =
                handle_frame(&mut self.frames, &mut self.socket, item, ctx, None)
            {
                self.socket.text(text, ctx);
            }
        }

        fn finished(&mut self, ctx: &mut Context<Self>) {
            finished(&self.socket, ctx);
        }
    }

    /// An echoer on one end of a loopback connection; returns the client's end, the actor,
    /// and what tells when the actor (and its socket's session slot) is gone.
    async fn echoer(
        read: BytesMut,
        stall: Duration,
    ) -> (TcpStream, Addr<Echoer>, oneshot::Receiver<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (done, ended) = oneshot::channel();
        let addr = Echoer::create(move |ctx| Echoer {
            socket: WsSocket::start(Upgraded { stream, read, done }, 1024, stall, ctx),
            frames: Assembler::new(1024),
        });
        (client, addr, ended)
    }

    fn encoded(payload: &[u8], op: OpCode, masked: bool) -> BytesMut {
        let mut buf = BytesMut::new();
        Parser::write_message(&mut buf, payload, op, true, masked);
        buf
    }

    fn close_frame(masked: bool) -> BytesMut {
        let mut buf = BytesMut::new();
        Parser::write_close(&mut buf, Some(CloseCode::Normal.into()), masked);
        buf
    }

    #[actix::test]
    async fn bytes_read_with_the_handshake_are_handled_and_the_server_hangs_up_after_a_close() {
        // A frame the client sent right behind its handshake, already read by the server.
        let (mut client, _, ended) = echoer(encoded(b"early", OpCode::Text, true), STALL).await;
        let echo = encoded(b"early", OpCode::Text, false);
        let mut got = vec![0; echo.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, &echo[..]);

        client.write_all(&close_frame(true)).await.unwrap();
        let mut rest = Vec::new();
        // Ends at EOF: the server shut its side once its close frame was out.
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &close_frame(false)[..]);
        let end = tokio::time::timeout(CLOSE_GRACE / 2, ended).await;
        assert!(
            matches!(end, Ok(Err(_))),
            "the actor and its session are gone"
        );
        drop(client);
    }

    #[actix::test]
    async fn the_session_ends_at_its_close_frame_while_the_socket_waits_for_the_peer() {
        let (mut client, _, ended) = echoer(close_frame(true), STALL).await;
        // The client keeps its side open: the actor (and so the session) still ends at once.
        let end = tokio::time::timeout(CLOSE_GRACE / 2, ended).await;
        assert!(
            matches!(end, Ok(Err(_))),
            "the actor ended without the peer"
        );
        // The lingering socket still takes what the client sends after the close (no reset),
        // and the client reads the close frame and then the server's end of stream.
        client
            .write_all(&encoded(b"late", OpCode::Text, true))
            .await
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, &close_frame(false)[..]);
    }

    #[actix::test]
    async fn a_peer_that_takes_nothing_of_a_full_backlog_is_dropped_after_the_stall_limit() {
        let stall = Duration::from_millis(300);
        let (client, addr, ended) = echoer(BytesMut::new(), stall).await;
        let handled = Arc::new(AtomicUsize::new(0));
        let text = "x".repeat(1000);
        // 30 MB: more than the kernel's buffers, so the actor waits on its socket, where
        // nothing else of it runs (a session's heartbeat neither): only the stall limit ends it.
        for _ in 0..30_000 {
            addr.do_send(Say(text.clone(), Arc::clone(&handled)));
        }
        let end = tokio::time::timeout(Duration::from_secs(10), ended).await;
        assert!(matches!(end, Ok(Err(_))), "the actor gave the peer up");
        assert!(handled.load(Ordering::Relaxed) < 30_000, "it was waiting");
        drop(client);
    }

    /// Test → echoer: write this text.
    struct Say(String, Arc<AtomicUsize>);

    impl Message for Say {
        type Result = ();
    }

    impl Handler<Say> for Echoer {
        type Result = ();

        fn handle(&mut self, Say(text, handled): Say, ctx: &mut Context<Self>) {
            handled.fetch_add(1, Ordering::Relaxed);
            self.socket.text(text, ctx);
        }
    }

    #[actix::test]
    async fn an_actor_whose_peer_does_not_read_takes_no_messages_until_it_does() {
        const FRAMES: usize = 30_000;
        let (mut client, addr, _ended) = echoer(BytesMut::new(), STALL).await;
        let handled = Arc::new(AtomicUsize::new(0));
        let text = "x".repeat(1000);
        // 30 MB: far more than the kernel's socket buffers hold.
        for _ in 0..FRAMES {
            addr.do_send(Say(text.clone(), Arc::clone(&handled)));
        }
        let mut last = usize::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = handled.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        assert!(
            last < FRAMES,
            "the actor stopped taking messages once its socket was full ({last})"
        );
        let frame = encoded(text.as_bytes(), OpCode::Text, false).len();
        let mut buf = vec![0; frame * FRAMES];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            handled.load(Ordering::Relaxed),
            FRAMES,
            "all of them once read"
        );
    }
}
