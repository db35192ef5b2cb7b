//! The fault proxy itself, against an echo server of its own (no external services): bytes
//! pass, `freeze_idle` freezes quiet flows only, `freeze_all` freezes open and new flows
//! without closing them, `thaw` delivers what they held, `sever` closes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Proxy, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long bytes that should come may take.
const PATIENCE: Duration = Duration::from_secs(2);

/// How long nothing must come for a flow to count as silent.
const SILENCE: Duration = Duration::from_millis(300);

/// An echo server on a free local port.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A proxy in front of an echo server of its own.
async fn echo_proxy() -> Proxy {
    Proxy::start(echo_server().await).await
}

async fn connect(proxy: &Proxy) -> TcpStream {
    let connecting = timeout(PATIENCE, TcpStream::connect(proxy.addr));
    connecting.await.expect("connect timed out").unwrap()
}

/// Reads exactly `n` bytes.
async fn receive(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    let reading = timeout(PATIENCE, s.read_exact(&mut buf));
    reading
        .await
        .expect("the bytes never came")
        .expect("the flow failed");
    buf
}

/// Sends `msg` and checks it comes back.
async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    assert_eq!(receive(s, msg.len()).await, msg);
}

/// Checks nothing comes for `SILENCE`: no bytes, no end of stream, no error.
async fn assert_silent(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    if let Ok(read) = timeout(SILENCE, s.read(&mut buf)).await {
        panic!("expected silence, got {read:?}");
    }
}

/// Checks the flow ends (end of stream or reset).
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let read = timeout(PATIENCE, s.read(&mut buf)).await;
    let read = read.expect("the flow was not closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected a close, got {read:?}"
    );
}

/// Echoes on `s` every 50 ms until told to stop; then hands `s` back.
fn keep_busy(mut s: TcpStream) -> (oneshot::Sender<()>, JoinHandle<TcpStream>) {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = &mut stopped => return s,
                _ = tick.tick() => echo(&mut s, b"ping").await,
            }
        }
    });
    (stop, task)
}

#[tokio::test]
async fn bytes_pass_both_ways() {
    let proxy = echo_proxy().await;
    let mut s = connect(&proxy).await;
    echo(&mut s, b"hello").await;
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let mut back = vec![0; big.len()];
    let (mut r, mut w) = s.split();
    let (sent, read) = tokio::join!(w.write_all(&big), r.read_exact(&mut back));
    sent.unwrap();
    read.unwrap();
    assert_eq!(back, big);
}

#[tokio::test]
async fn freeze_idle_freezes_a_quiet_flow_only_and_thaw_delivers_what_it_held() {
    let proxy = echo_proxy().await;
    let (mut quiet, mut busy) = (connect(&proxy).await, connect(&proxy).await);
    echo(&mut quiet, b"hello").await;
    echo(&mut busy, b"hello").await;
    let (stop, busy) = keep_busy(busy);
    proxy.freeze_idle(Duration::from_millis(400));
    eventually("the quiet flow to freeze", PATIENCE, || async {
        proxy.frozen_flows() == 1
    })
    .await;
    quiet.write_all(b"held").await.unwrap();
    assert_silent(&mut quiet).await;
    let mut fresh = connect(&proxy).await;
    echo(&mut fresh, b"a new flow works").await;
    stop.send(()).unwrap();
    echo(&mut busy.await.unwrap(), b"the busy flow works").await;
    assert_eq!(proxy.frozen_flows(), 1, "only the quiet flow froze");

    proxy.thaw();
    assert_eq!(receive(&mut quiet, 4).await, b"held");
    echo(&mut quiet, b"and carries on").await;
    assert_eq!(proxy.frozen_flows(), 0);
}

#[tokio::test]
async fn freeze_all_freezes_open_and_new_flows_without_closing_them() {
    let proxy = echo_proxy().await;
    let mut open = connect(&proxy).await;
    echo(&mut open, b"hello").await;
    proxy.freeze_all();
    let mut new = connect(&proxy).await;
    eventually("both flows to freeze", PATIENCE, || async {
        proxy.frozen_flows() == 2
    })
    .await;
    open.write_all(b"one").await.unwrap();
    new.write_all(b"two").await.unwrap();
    tokio::join!(assert_silent(&mut open), assert_silent(&mut new));

    proxy.thaw();
    assert_eq!(receive(&mut open, 3).await, b"one");
    assert_eq!(receive(&mut new, 3).await, b"two");
    assert_eq!(proxy.frozen_flows(), 0);
}

#[tokio::test]
async fn a_frozen_flow_holds_a_close_too() {
    let proxy = echo_proxy().await;
    let mut s = connect(&proxy).await;
    echo(&mut s, b"hello").await;
    proxy.freeze_all();
    s.shutdown().await.unwrap(); // unfrozen, the proxy would end the flow on this
    assert_silent(&mut s).await;
    assert_eq!(proxy.open_flows(), 1);

    proxy.thaw();
    assert_closed(&mut s).await;
}

#[tokio::test]
async fn freeze_all_accepts_clients_without_a_target() {
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], free_port()))).await;
    proxy.freeze_all();
    let mut client = connect(&proxy).await;
    client.write_all(b"anyone?").await.unwrap();
    assert_silent(&mut client).await;
    assert_eq!(proxy.frozen_flows(), 1);

    proxy.thaw();
    assert_closed(&mut client).await; // it now tries the target and finds nothing
}
