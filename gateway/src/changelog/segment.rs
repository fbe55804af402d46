//! Segment files: naming, creation, positioned appends, sealing, and offline inspection.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::format::{self, Decoded, End, Footer, SegmentHeader, FOOTER_LEN, HEADER_LEN};

/// File name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{seq:020}.log")
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_name(seq))
}

/// The sequence number in a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Segment files in `dir`, by sequence number.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes all of `bufs` at `offset` with `pwritev`, retrying short writes.
pub fn pwritev_all(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    let mut first = 0;
    while first < bufs.len() {
        let iov: Vec<libc::iovec> = bufs[first..]
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let cnt = iov.len().min(1024) as libc::c_int;
        // SAFETY: every iovec points into a live borrowed slice of the stated length; the
        // descriptor is open for the duration of the call.
        let r = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), cnt, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = r as usize;
        offset += n as u64;
        while n > 0 && first < bufs.len() {
            if n >= bufs[first].len() {
                n -= bufs[first].len();
                first += 1;
            } else {
                bufs[first] = &bufs[first][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Asks the kernel to drop the page-cache pages of `[from, to)` of `file`
/// (`POSIX_FADV_DONTNEED`): clean pages not mapped anywhere are freed, dirty or mapped ones
/// stay, and the file's bytes are unchanged — a read brings them back from the disk. A hint:
/// its failure costs memory, never data.
pub fn drop_cached(file: &File, from: u64, to: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from)))
    else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: posix_fadvise on a descriptor `file` keeps open for the call; no memory is
    // passed to the kernel.
    let r =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Creates a new segment file with its header (not yet synced).
pub fn create_segment(dir: &Path, header: &SegmentHeader) -> io::Result<(PathBuf, File)> {
    let path = segment_path(dir, header.seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all_at(&format::encode_header(header), 0)?;
    Ok((path, file))
}

/// Seals a segment whose header and records occupy `[0, valid_len)`, with its seal digest
/// `sha256` (see [`format::seal_digest`]): cuts anything after, appends the footer and makes the file durable with `sync` (the disk's
/// [`super::durable::Durability`]). Returns the sealed file length.
pub fn seal_file(
    file: &File,
    valid_len: u64,
    count: u64,
    last_lsn: u64,
    sha256: [u8; 32],
    sync: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<u64> {
    file.set_len(valid_len)?;
    let footer = Footer {
        record_count: count,
        last_lsn,
        footer_offset: valid_len,
        sha256,
    };
    file.write_all_at(&format::encode_footer(&footer), valid_len)?;
    sync(file)?;
    Ok(valid_len + FOOTER_LEN as u64)
}

/// fsync of a directory (makes file creations, renames and removals in it durable).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What an offline look at one segment file found.
#[derive(Debug, Clone)]
pub struct SegmentSummary {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// Decoded content, or why the header is unusable.
    pub decoded: Result<Decoded, String>,
}

impl SegmentSummary {
    /// "sealed", "active", or "torn at N: reason" / "unreadable: reason".
    pub fn status(&self) -> String {
        match &self.decoded {
            Err(e) => format!("unreadable: {e}"),
            Ok(d) => match &d.end {
                End::Sealed(_) => "sealed".to_string(),
                End::Open => "active".to_string(),
                End::Torn { reason } => format!("torn at byte {}: {reason}", d.valid_len),
            },
        }
    }
}

/// Reads and decodes one segment file.
pub fn inspect_file(seq: u64, path: &Path) -> io::Result<(SegmentSummary, Vec<u8>)> {
    let bytes = fs::read(path)?;
    let decoded = format::decode_segment(&bytes).map_err(|e| e.to_string());
    Ok((
        SegmentSummary {
            seq,
            path: path.to_path_buf(),
            bytes: bytes.len() as u64,
            decoded,
        },
        bytes,
    ))
}

/// Whether a file is too short to even hold a header (a segment torn while being created).
pub fn is_stub(len: u64) -> bool {
    len < HEADER_LEN as u64
}
