//! The face's HTTP/1.1 client to reference nodes' REAR gateways: plain HTTP (the reference
//! node serves nothing else), one request per connection (`Connection: close`, as the
//! reference node's own client), a connect time-out, a whole-request time-out and a cap on
//! the answer (head and body together), so a reference node that hangs, trickles or answers
//! megabytes costs the face at most those bounds.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer: status and body (chunked encoding undone).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Bounds of one request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connect: Duration,
    pub whole: Duration,
    pub max_bytes: usize,
}

/// `method path` on `endpoint` (`host:port`) with an optional JSON body.
pub async fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    limits: Limits,
) -> Result<Answer, String> {
    match tokio::time::timeout(limits.whole, exchange(endpoint, method, path, body, limits)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no whole answer within {:?}", limits.whole)),
    }
}

async fn exchange(
    endpoint: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    limits: Limits,
) -> Result<Answer, String> {
    let mut s = match tokio::time::timeout(limits.connect, tokio::net::TcpStream::connect(endpoint))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => {
            return Err(format!(
                "connect: no connection within {:?}",
                limits.connect
            ))
        }
    };
    let _ = s.set_nodelay(true);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\nUser-Agent: fluidlet-supernode\r\nAccept: application/json\r\n"
    );
    match body {
        Some(b) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None if method == "POST" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    s.write_all(&out).await.map_err(|e| format!("send: {e}"))?;
    let mut raw: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        if raw.len() + n > limits.max_bytes {
            return Err(format!("answer over {} bytes", limits.max_bytes));
        }
        raw.extend_from_slice(&chunk[..n]);
        // A complete answer ends the exchange even if the server keeps the connection.
        if let Some(Ok(a)) = parse(&raw, false) {
            return Ok(a);
        }
    }
    match parse(&raw, true) {
        Some(r) => r,
        None => Err("the connection closed before a whole answer".into()),
    }
}

/// Parses an answer: `None` while incomplete (unless `eof`: then what is there is the body
/// when no length was given).
fn parse(raw: &[u8], eof: bool) -> Option<Result<Answer, String>> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let Ok(head) = std::str::from_utf8(&raw[..end]) else {
        return Some(Err("the answer's head is not text".into()));
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    let Some(status) = status else {
        return Some(Err("not an HTTP/1.x answer".into()));
    };
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                match v.parse::<usize>() {
                    Ok(n) => length = Some(n),
                    Err(_) => return Some(Err("a bad Content-Length".into())),
                }
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let rest = &raw[end + 4..];
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Some(Ok(Answer {
            status,
            body: Vec::new(),
        }));
    }
    if chunked {
        return match dechunk(rest) {
            Some(body) => Some(Ok(Answer { status, body })),
            None if eof => Some(Err("a truncated chunked answer".into())),
            None => None,
        };
    }
    match length {
        Some(n) if rest.len() >= n => Some(Ok(Answer {
            status,
            body: rest[..n].to_vec(),
        })),
        Some(_) if eof => Some(Err("the answer is shorter than its Content-Length".into())),
        Some(_) => None,
        None if eof => Some(Ok(Answer {
            status,
            body: rest.to_vec(),
        })),
        None => None,
    }
}

/// The body of a chunked answer, `None` until its last chunk is there.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..i]).ok()?;
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).ok()?;
        let start = i + 2;
        if n == 0 {
            return Some(out);
        }
        let stop = start.checked_add(n)?;
        if b.len() < stop + 2 {
            return None;
        }
        out.extend_from_slice(&b[start..stop]);
        b = &b[stop + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_by_length_chunks_or_close() {
        let a = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", false)
            .unwrap()
            .unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"[]"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[]", false).is_none());
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[]", true)
                .unwrap()
                .is_err()
        );
        let c = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[1\r\n1\r\n]\r\n0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.body, b"[1]");
        let e = parse(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((e.status, e.body.len()), (204, 0));
        assert!(parse(b"SSH-2.0\r\n\r\n", true).unwrap().is_err());
    }
}
