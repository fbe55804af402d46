//! The reference model of the simulation: per 512-byte sector, the value that must survive a
//! crash (the last one made durable by a completed FLUSH or a FUA write) and the values that
//! may (every write since, acknowledged or in flight) — the NBD contract.

use super::storage::SECTOR;

#[derive(Debug, Clone)]
struct Sector {
    durable: Vec<u8>,
    maybe: Vec<Vec<u8>>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Model {
    sectors: Vec<Sector>,
    /// What a read returns now (every acknowledged change applied).
    latest: Vec<u8>,
}

impl Model {
    /// A disk whose initial bytes are durable.
    pub fn new(initial: &[u8]) -> Self {
        Self {
            sectors: initial
                .chunks(SECTOR)
                .map(|c| Sector {
                    durable: c.to_vec(),
                    maybe: Vec::new(),
                })
                .collect(),
            latest: initial.to_vec(),
        }
    }

    pub fn latest(&self) -> &[u8] {
        &self.latest
    }

    /// A change of `data` at `offset` (sector-aligned) was acknowledged (`acked`) or was in
    /// flight at the crash; with `durable` (FUA) it is durable too.
    pub fn change(&mut self, offset: u64, data: &[u8], acked: bool, durable: bool) {
        let first = offset as usize / SECTOR;
        for (i, c) in data.chunks(SECTOR).enumerate() {
            let s = &mut self.sectors[first + i];
            if durable && acked {
                s.durable = c.to_vec();
                s.maybe.clear();
            } else {
                s.maybe.push(c.to_vec());
            }
        }
        if acked {
            let o = offset as usize;
            self.latest[o..o + data.len()].copy_from_slice(data);
        }
    }

    /// A FLUSH completed: every acknowledged change is durable.
    pub fn flushed(&mut self) {
        for (i, s) in self.sectors.iter_mut().enumerate() {
            let (a, b) = (i * SECTOR, ((i + 1) * SECTOR).min(self.latest.len()));
            s.durable = self.latest[a..b].to_vec();
            s.maybe.clear();
        }
    }

    /// The first sector of `image` that a crash could not have left, with what it holds.
    pub fn check(&self, image: &[u8]) -> Result<(), String> {
        if image.len() != self.latest.len() {
            return Err(format!(
                "image has {} bytes, the disk {}",
                image.len(),
                self.latest.len()
            ));
        }
        for (i, s) in self.sectors.iter().enumerate() {
            let (a, b) = (i * SECTOR, ((i + 1) * SECTOR).min(image.len()));
            let got = &image[a..b];
            if got != s.durable.as_slice() && !s.maybe.iter().any(|m| m.as_slice() == got) {
                return Err(format!(
                    "sector {i} (byte {a}) holds a value no write put there durably or since the last flush ({} candidates since; first bytes {:02x?}, durable {:02x?})",
                    s.maybe.len(),
                    &got[..8.min(got.len())],
                    &s.durable[..8.min(s.durable.len())]
                ));
            }
        }
        Ok(())
    }
}
