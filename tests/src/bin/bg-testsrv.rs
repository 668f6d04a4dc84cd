//! A tiny server for the backends of tests and the demo, one thread per connection. Prints
//! `listening on ADDR` once bound.
//! - HTTP/1.1 (default): answers every request with a fixed body (the backend's color) and
//!   keeps connections alive.
//! - `--echo`: a long-lived line stream; every line is answered with `BODY LINE`.
//! - `--udp`: every datagram is answered with `BODY DATAGRAM`, from the address it came to.
//! - `--delay-ms N`: HTTP answers leave N ms after their request (a slow backend).
//! - `--accept-close`: accepts and closes every connection on one thread (a target for TCP
//!   health checks by the thousand).
//! - `--tun NAME --delay-ms N`: a delay line instead of a server: creates the TUN device NAME
//!   and writes every packet read from it back into it N ms later (in order; a line on stdin
//!   with another number of milliseconds changes N for the packets read after it). Routed through
//!   it, a host's packets leave N ms late: the tests' stand-in for `tc netem delay`, which
//!   this kernel is built without (CONFIG_NET_SCH_NETEM off).

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
};

fn serve(stream: TcpStream, body: &str, delay: std::time::Duration) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        // Request line and headers, up to the empty line.
        let mut close = false;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if first {
                first = false;
                close = line.ends_with("HTTP/1.0\r\n");
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("connection:") {
                close = lower.contains("close");
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let text = format!("{body}\n");
        std::thread::sleep(delay);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        )?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn echo(stream: TcpStream, body: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = String::new();
    while reader.read_line(&mut line)? != 0 {
        write!(out, "{body} {line}")?;
        out.flush()?;
        line.clear();
    }
    Ok(())
}

/// The delay line (`--tun`): never returns.
fn delay_line(name: &str, delay: std::time::Duration) -> ! {
    use std::os::fd::{AsRawFd, FromRawFd};
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let fail = |what: &str| -> ! {
        eprintln!("bg-testsrv: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1)
    };
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        fail("opening /dev/net/tun");
    }
    // struct ifreq: the name, then the flags (a short) at offset 16.
    let mut ifr = [0u8; 40];
    if name.is_empty() || name.len() > 15 {
        eprintln!("bg-testsrv: --tun takes an interface name of 1 to 15 bytes");
        std::process::exit(2);
    }
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&((libc::IFF_TUN | libc::IFF_NO_PI) as i16).to_ne_bytes());
    if unsafe { libc::ioctl(fd, TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        fail("TUNSETIFF");
    }
    let tun = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut writer = tun.try_clone().unwrap_or_else(|_| fail("dup of the TUN fd"));
    let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(delay.as_millis() as u64));
    let set = delay_ms.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if let Ok(ms) = line.trim().parse::<u64>() {
                set.store(ms, std::sync::atomic::Ordering::Relaxed);
                println!("delay {ms} ms");
            }
        }
    });
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, packet) in rx {
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = std::io::Write::write(&mut writer, &packet);
        }
    });
    println!("listening on tun {name} (delay {} ms, fd {})", delay.as_millis(), tun.as_raw_fd());
    let mut tun = tun;
    let mut buf = vec![0u8; 65536];
    loop {
        match std::io::Read::read(&mut tun, &mut buf) {
            Ok(n) => {
                let d = std::time::Duration::from_millis(delay_ms.load(std::sync::atomic::Ordering::Relaxed));
                let _ = tx.send((std::time::Instant::now() + d, buf[..n].to_vec()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => fail("reading the TUN device"),
        }
    }
}

fn main() {
    let mut tun = None;
    let mut listen = None;
    let mut body = None;
    let mut echo_mode = false;
    let mut udp = false;
    let mut accept_close = false;
    let mut delay = std::time::Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--body" => body = args.next(),
            "--echo" => echo_mode = true,
            "--udp" => udp = true,
            "--accept-close" => accept_close = true,
            "--tun" => tun = args.next(),
            "--delay-ms" => match args.next().and_then(|v| v.parse().ok()) {
                Some(ms) => delay = std::time::Duration::from_millis(ms),
                None => {
                    eprintln!("bg-testsrv: --delay-ms takes a number of milliseconds");
                    std::process::exit(2);
                }
            },
            other => {
                eprintln!("bg-testsrv: unknown argument `{other}`; usage: bg-testsrv --listen ADDR:PORT --body TEXT [--echo | --udp | --accept-close] [--delay-ms N], or bg-testsrv --tun NAME --delay-ms N");
                std::process::exit(2);
            }
        }
    }
    if let Some(name) = tun {
        delay_line(&name, delay);
    }
    let (Some(listen), Some(body)) = (listen, body) else {
        eprintln!("bg-testsrv: usage: bg-testsrv --listen ADDR:PORT --body TEXT");
        std::process::exit(2);
    };
    if udp {
        let socket = std::net::UdpSocket::bind(&listen).unwrap_or_else(|e| {
            eprintln!("bg-testsrv: cannot listen on udp {listen}: {e}");
            std::process::exit(1);
        });
        println!("listening on udp {listen}");
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
            let mut answer = format!("{body} ").into_bytes();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from);
        }
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("bg-testsrv: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    // A deep accept queue (std listens with 128): the maximum-config test sends one server
    // 5000 health checks a second, and a full queue drops SYNs (a 1 s stall for the client).
    // listen(2) again on a listening socket only changes its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    println!("listening on {listen}");
    if accept_close {
        for stream in listener.incoming() {
            drop(stream);
        }
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = if echo_mode { echo(stream, &body) } else { serve(stream, &body, delay) };
        });
    }
}
