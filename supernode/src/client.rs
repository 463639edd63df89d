//! The face's HTTP/1.1 client to reference nodes' REAR gateways (hyper's client connection):
//! plain HTTP (the reference node serves nothing else), one request per connection
//! (`Connection: close`, as the reference node's own client), a connect time-out, a
//! whole-request time-out and caps on the answer's head (hyper's read buffer) and body
//! (`Limited`), so a reference node that hangs, trickles or answers megabytes costs the face
//! at most those bounds.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ACCEPT, CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Largest answer head (status line and headers) read: hyper's read buffer.
const MAX_HEAD: usize = 64 * 1024;

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
    let stream = match tokio::time::timeout(
        limits.connect,
        tokio::net::TcpStream::connect(endpoint),
    )
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
    let _ = stream.set_nodelay(true);
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| format!("{e}"))?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .map_err(|e| format!("request: {e}"))?;
    let h = req.headers_mut();
    h.insert(
        HOST,
        HeaderValue::from_str(endpoint).map_err(|e| format!("host {endpoint}: {e}"))?,
    );
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    h.insert(USER_AGENT, HeaderValue::from_static("fluidlet-supernode"));
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    if body.is_some() {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let work = async {
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("exchange: {e}"))?;
        let status = res.status().as_u16();
        let body = Limited::new(res.into_body(), limits.max_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    format!("answer over {} bytes", limits.max_bytes)
                } else {
                    format!("read: {e}")
                }
            })?
            .to_bytes();
        Ok(Answer {
            status,
            body: body.to_vec(),
        })
    };
    // The connection is driven beside the exchange, in this task: it ends when the server
    // closes (after the answer, `Connection: close`), or fails first.
    tokio::pin!(work, conn);
    tokio::select! {
        r = &mut work => r,
        c = &mut conn => match c {
            Err(e) => Err(format!("exchange: {e}")),
            Ok(()) => work.await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot server that answers `raw` to the first request and closes.
    async fn serve(raw: impl AsRef<[u8]>) -> String {
        let raw: Vec<u8> = raw.as_ref().to_vec();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&raw).await;
        });
        addr
    }

    fn limits(max_bytes: usize) -> Limits {
        Limits {
            connect: Duration::from_secs(5),
            whole: Duration::from_secs(5),
            max_bytes,
        }
    }

    #[tokio::test]
    async fn answers_by_length_chunks_or_close_and_204_without_body() {
        let at = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]").await;
        let a = request(&at, "GET", "/x", None, limits(1024)).await.unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"[]"[..]));
        let at = serve(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[1\r\n1\r\n]\r\n0\r\n\r\n",
        )
        .await;
        let c = request(&at, "POST", "/y", Some(b"{}"), limits(1024))
            .await
            .unwrap();
        assert_eq!(c.body, b"[1]");
        let at = serve(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[2]").await;
        let e = request(&at, "GET", "/z", None, limits(1024)).await.unwrap();
        assert_eq!(e.body, b"[2]");
        let at = serve(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let n = request(&at, "GET", "/", None, limits(1024)).await.unwrap();
        assert_eq!((n.status, n.body.len()), (204, 0));
    }

    #[tokio::test]
    async fn short_big_and_garbage_answers_are_errors() {
        let at = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[]").await;
        assert!(request(&at, "GET", "/", None, limits(1024)).await.is_err());
        let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 4000));
        let at = serve(big).await;
        let e = request(&at, "GET", "/", None, limits(100))
            .await
            .unwrap_err();
        assert!(e.contains("over 100 bytes"), "{e}");
        let at = serve(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        assert!(request(&at, "GET", "/", None, limits(1024)).await.is_err());
    }
}
