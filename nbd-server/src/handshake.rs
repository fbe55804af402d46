//! Fixed-newstyle handshake and option haggling.
//!
//! Every option that names an export looks it up through [`Ctx::lookup`], which hides the
//! exports the client may not open ([`Access`]): they are answered exactly like unknown names.

use std::any::Any;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::access::Access;
use crate::device::BlockDevice;
use crate::export::{Export, Exports};
use crate::proto::*;
use crate::tls::{ClientIdentity, TlsConfig};
use crate::SessionError;

/// Any byte stream the server can talk NBD over (TCP, Unix socket, TLS on either).
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The stream's two directions, for the transmission phase, whose request reader and
    /// reply writer run at once on different threads.
    ///
    /// A TCP or Unix socket is split without a lock (`into_split`: each half polls the
    /// socket's own readiness), any other stream (TLS) with `tokio::io::split`, whose halves
    /// share a mutex held across each read and write system call. Under load that mutex
    /// made the request reader wait, asleep, for a reply writer that the kernel had
    /// preempted inside its `writev` (the reply wakes the client on the same core), and the
    /// other core went idle meanwhile.
    fn into_halves(self: Box<Self>) -> (ReadHalf, WriteHalf);
}

/// The reading direction of a [`BoxStream`].
pub type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
/// The writing direction of a [`BoxStream`].
pub type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {
    fn into_halves(self: Box<Self>) -> (ReadHalf, WriteHalf) {
        let any: Box<dyn Any + Send> = self;
        let any = match any.downcast::<tokio::net::TcpStream>() {
            Ok(s) => {
                let (r, w) = s.into_split();
                return (Box::new(r), Box::new(w));
            }
            Err(any) => any,
        };
        let any = match any.downcast::<tokio::net::UnixStream>() {
            Ok(s) => {
                let (r, w) = s.into_split();
                return (Box::new(r), Box::new(w));
            }
            Err(any) => any,
        };
        match any.downcast::<T>() {
            Ok(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
            // `any` is the `Box<T>` this method was given: it downcasts to `T`.
            Err(_) => unreachable!("a boxed stream downcasts to its own type"),
        }
    }
}

pub type BoxStream = Box<dyn AsyncStream>;

/// What the client negotiated, carried into the transmission phase.
#[derive(Debug, Default, Clone)]
pub struct Negotiated {
    pub structured: bool,
    /// Export name for which `base:allocation` was selected by the last SET_META_CONTEXT.
    pub meta_export: Option<String>,
    pub tls: bool,
    /// Who the client proved to be with its TLS certificate.
    pub client: Option<ClientIdentity>,
}

/// Result of a handshake: either an export to serve, or a clean end.
pub enum Outcome<D> {
    Transmission {
        stream: BoxStream,
        export: Arc<Export<D>>,
        negotiated: Negotiated,
    },
    Closed,
}

struct Ctx<'a, D> {
    exports: &'a Exports<D>,
    tls: Option<&'a TlsConfig>,
    access: &'a Access,
    neg: Negotiated,
}

impl<D: BlockDevice> Ctx<'_, D> {
    /// The export `name`, if it exists and this client may open it.
    fn lookup(&self, name: &str) -> Option<Arc<Export<D>>> {
        let export = self.exports.get(name)?;
        if self.access.permits(&export.name, self.neg.client.as_ref()) {
            Some(export)
        } else {
            info!(
                export = %export.name,
                client = %self.neg.client.as_ref().map_or("(no certificate)".into(), |c| c.display_name()),
                "export refused: the client is not in its allow-list"
            );
            None
        }
    }
}

/// Transmission flags for an export under a negotiation.
pub fn transmission_flags<D: BlockDevice>(export: &Export<D>, neg: &Negotiated) -> u16 {
    let f = export.device.flags();
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if export.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_WRITE_ZEROES;
        if f.trim {
            flags |= TFLAG_SEND_TRIM;
        }
        if f.fast_zero {
            flags |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if neg.structured {
        flags |= TFLAG_SEND_DF;
    }
    if f.flush_covers_all_connections {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    if f.rotational {
        flags |= TFLAG_ROTATIONAL;
    }
    flags
}

async fn send_reply(
    s: &mut BoxStream,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), SessionError> {
    let len = u32::try_from(data.len()).map_err(|_| SessionError::Protocol("reply too large"))?;
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&option_reply_header(option, reply, len));
    buf.extend_from_slice(data);
    s.write_all(&buf).await?;
    s.flush().await?;
    Ok(())
}

async fn send_error(
    s: &mut BoxStream,
    option: u32,
    reply: u32,
    msg: &str,
) -> Result<(), SessionError> {
    debug!(option, reply, msg, "option refused");
    send_reply(s, option, reply, msg.as_bytes()).await
}

/// Reads and discards `len` bytes.
async fn drain(s: &mut BoxStream, len: u64) -> Result<(), SessionError> {
    let mut take = (&mut *s).take(len);
    let n = tokio::io::copy(&mut take, &mut tokio::io::sink()).await?;
    if n != len {
        return Err(SessionError::Disconnected);
    }
    Ok(())
}

/// Runs the handshake on a fresh connection.
pub async fn negotiate<D: BlockDevice>(
    mut s: BoxStream,
    exports: &Exports<D>,
    tls: Option<&TlsConfig>,
    access: &Access,
) -> Result<Outcome<D>, SessionError> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(SessionError::Protocol("unknown client flags"));
    }
    if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(SessionError::Protocol(
            "client does not support fixed newstyle negotiation",
        ));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;

    let mut ctx = Ctx {
        exports,
        tls,
        access,
        neg: Negotiated::default(),
    };

    for _ in 0..MAX_OPTIONS {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(SessionError::Protocol("bad option magic"));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;

        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: the only answer is to hang up.
                return Err(SessionError::Protocol("export name too long"));
            }
            drain(&mut s, u64::from(len)).await?;
            send_error(&mut s, option, REP_ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;

        let tls_required = ctx.tls.is_some_and(|t| t.required) && !ctx.neg.tls;
        if tls_required && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(SessionError::Protocol("TLS required"));
            }
            send_error(
                &mut s,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: use STARTTLS",
            )
            .await?;
            continue;
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = match decode_export_name(&data) {
                    Ok(n) => n,
                    Err(_) => return Err(SessionError::Protocol("bad export name")),
                };
                let Some(export) = ctx.lookup(&name) else {
                    info!(export = %name, "client asked for unknown export");
                    return Err(SessionError::UnknownExport(name));
                };
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.device.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&export, &ctx.neg).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&reply).await?;
                s.flush().await?;
                return Ok(Outcome::Transmission {
                    stream: s,
                    export,
                    negotiated: ctx.neg,
                });
            }
            OPT_ABORT => {
                // Best effort: the client may already have gone.
                let _ = send_reply(&mut s, option, REP_ACK, &[]).await;
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_error(&mut s, option, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                let visible = ctx
                    .exports
                    .list()
                    .into_iter()
                    .filter(|e| ctx.access.permits(&e.name, ctx.neg.client.as_ref()));
                for e in visible {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    send_reply(&mut s, option, REP_SERVER, &d).await?;
                }
                send_reply(&mut s, option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    send_error(&mut s, option, REP_ERR_INVALID, "STARTTLS takes no data").await?;
                    continue;
                }
                let Some(tls) = ctx.tls else {
                    send_error(&mut s, option, REP_ERR_UNSUP, "TLS is not configured").await?;
                    continue;
                };
                if ctx.neg.tls {
                    send_error(&mut s, option, REP_ERR_INVALID, "TLS already negotiated").await?;
                    continue;
                }
                send_reply(&mut s, option, REP_ACK, &[]).await?;
                let tls_stream = tls.acceptor.accept(s).await.map_err(SessionError::Tls)?;
                let client = tls_stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(ClientIdentity::from_certificate);
                if let Some(c) = &client {
                    debug!(client = %c.display_name(), "client certificate verified");
                }
                s = Box::new(tls_stream);
                // Everything negotiated before STARTTLS is forgotten.
                ctx.neg = Negotiated {
                    tls: true,
                    client,
                    ..Negotiated::default()
                };
            }
            OPT_INFO | OPT_GO => {
                let req = match decode_info(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_error(&mut s, option, REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(export) = ctx.lookup(&req.name) else {
                    let msg = format!("no export named '{}'", req.name);
                    send_error(&mut s, option, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                send_info(&mut s, option, &export, &ctx.neg, &req.requests).await?;
                send_reply(&mut s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    // If meta contexts were selected for another export, they do not apply.
                    if ctx.neg.meta_export.as_deref() != Some(export.name.as_str()) {
                        ctx.neg.meta_export = None;
                    }
                    return Ok(Outcome::Transmission {
                        stream: s,
                        export,
                        negotiated: ctx.neg,
                    });
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(&mut s, option, REP_ERR_INVALID, "takes no data").await?;
                    continue;
                }
                ctx.neg.structured = true;
                send_reply(&mut s, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    ctx.neg.meta_export = None;
                }
                if !ctx.neg.structured {
                    let msg = "negotiate structured replies first";
                    send_error(&mut s, option, REP_ERR_INVALID, msg).await?;
                    continue;
                }
                let req = match decode_meta(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_error(&mut s, option, REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let Some(export) = ctx.lookup(&req.export) else {
                    let msg = format!("no export named '{}'", req.export);
                    send_error(&mut s, option, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let selected = if req.queries.is_empty() {
                    !set
                } else {
                    req.queries
                        .iter()
                        .any(|q| query_matches_base_allocation(q, !set))
                };
                if selected {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                    d.extend_from_slice(&id.to_be_bytes());
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    send_reply(&mut s, option, REP_META_CONTEXT, &d).await?;
                    if set {
                        ctx.neg.meta_export = Some(export.name.clone());
                    }
                }
                send_reply(&mut s, option, REP_ACK, &[]).await?;
            }
            other => {
                debug!(option = other, "unsupported option");
                send_error(&mut s, other, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
    Err(SessionError::Protocol("too many options"))
}

async fn send_info<D: BlockDevice>(
    s: &mut BoxStream,
    option: u32,
    export: &Export<D>,
    neg: &Negotiated,
    requests: &[u16],
) -> Result<(), SessionError> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.device.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, neg).to_be_bytes());
    send_reply(s, option, REP_INFO, &d).await?;

    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        send_reply(s, option, REP_INFO, &d).await?;
    }
    if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.description.as_bytes());
        send_reply(s, option, REP_INFO, &d).await?;
    }
    // Block sizes are always advertised: clients that did not ask may ignore them.
    let bs = export.device.block_size();
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&bs.minimum.to_be_bytes());
    d.extend_from_slice(&bs.preferred.to_be_bytes());
    d.extend_from_slice(&bs.maximum.to_be_bytes());
    send_reply(s, option, REP_INFO, &d).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both directions of a stream's halves carry bytes at once: a read waiting for data
    /// does not hold up a write on the other half. For each kind of stream `into_halves`
    /// splits differently (TCP and Unix sockets without a lock, anything else with one).
    async fn halves_carry_both_ways(ours: BoxStream, mut theirs: impl AsyncStream) {
        let (mut rd, mut wr) = ours.into_halves();
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 5];
            rd.read_exact(&mut b).await.map(|_| b)
        });
        // The read above waits; the write goes out meanwhile.
        wr.write_all(b"reply").await.unwrap();
        wr.flush().await.unwrap();
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        theirs.write_all(b"query").await.unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"query");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn halves_of_tcp_unix_and_other_streams() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        halves_carry_both_ways(Box::new(server.unwrap().0), client.unwrap()).await;

        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        halves_carry_both_ways(Box::new(a), b).await;

        let (a, b) = tokio::io::duplex(64);
        halves_carry_both_ways(Box::new(a), b).await;
    }
}
