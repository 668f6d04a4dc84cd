//! Long-lived connections through the VIP, used while bg is flipped, upgraded or restarted:
//! line streams to the echo service and HTTP/1.1 keep-alive connections, each exchanged on in
//! rounds, every answer checked for the color the connection started on.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::{
    netns::InNetns,
    topology::{Topology, ECHO_PORT, VIP, VIP_PORT},
};

/// One HTTP/1.1 keep-alive request on an open connection; returns the body.
pub fn http_get(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    reader.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
    let mut len = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; len.unwrap_or(0)];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// What the long-lived connections saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub rounds: u64,
    pub exchanges: u64,
    /// Answers from another color than the one the connection started on (a moved connection).
    pub moved: Vec<String>,
    /// Read/write errors, EOFs and timeouts (a reset or broken connection).
    pub errors: Vec<String>,
}

/// From the client namespace: opens `streams` echo connections and `http` keep-alive HTTP
/// connections to the VIP, checks each is answered by `color`, reports on `opened`, then
/// exchanges on every connection in rounds (10 ms apart) until `stop`, the first error or
/// `LOAD_LIMIT`.
pub fn hold(t: &Topology, color: &str, streams: usize, http: usize, opened: std::sync::mpsc::Sender<()>, stop: &AtomicBool) -> Seen {
    hold_from(&t.client, color, streams, http, opened, stop)
}

/// `hold` from the namespace `client` (any topology with the VIP's echo and web services).
pub fn hold_from(client: &crate::netns::Netns, color: &str, streams: usize, http: usize, opened: std::sync::mpsc::Sender<()>, stop: &AtomicBool) -> Seen {
    let _inside = InNetns::enter(client).expect("enter the client namespace");
    let connect = |port: u16| {
        let addr = SocketAddr::new(VIP.parse().unwrap(), port);
        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the VIP");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        BufReader::new(c)
    };
    let mut echo: Vec<BufReader<TcpStream>> = (0..streams).map(|_| connect(ECHO_PORT)).collect();
    let mut web: Vec<BufReader<TcpStream>> = (0..http).map(|_| connect(VIP_PORT)).collect();
    let mut seen = Seen::default();
    for c in &mut web {
        match http_get(c) {
            Ok(body) if body == color => {}
            other => seen.errors.push(format!("first request: {other:?}")),
        }
    }
    let _ = opened.send(());
    let until = std::time::Instant::now() + crate::topology::LOAD_LIMIT;
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
        for (i, c) in echo.iter_mut().enumerate() {
            let msg = format!("s{i} r{}\n", seen.rounds);
            let mut answer = String::new();
            match c.get_mut().write_all(msg.as_bytes()).and_then(|_| c.read_line(&mut answer)) {
                Ok(0) => seen.errors.push(format!("stream {i}: closed")),
                Ok(_) if answer == format!("{color} {msg}") => seen.exchanges += 1,
                Ok(_) => seen.moved.push(format!("stream {i}: {answer:?}")),
                Err(e) => seen.errors.push(format!("stream {i}: {e}")),
            }
        }
        for (i, c) in web.iter_mut().enumerate() {
            match http_get(c) {
                Ok(body) if body == color => seen.exchanges += 1,
                Ok(body) => seen.moved.push(format!("http {i}: {body}")),
                Err(e) => seen.errors.push(format!("http {i}: {e}")),
            }
        }
        seen.rounds += 1;
        if !seen.errors.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// `EstabResets` (connections reset from ESTABLISHED or CLOSE_WAIT) in each of the topology's
/// namespaces: client, gateway, blue, green.
pub fn resets(t: &Topology) -> [u64; 4] {
    [&t.client, &t.gw, &t.blue, &t.green].map(|ns| Topology::tcp_counter(ns, "EstabResets").unwrap())
}

/// Sets the flag when dropped, also when the test panics: threads that loop on it end, and a
/// `thread::scope` waiting for them returns.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
