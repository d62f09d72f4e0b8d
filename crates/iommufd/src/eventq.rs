//! vEVENTQ and FAULT queues: the records, their byte format for `read()`, and page-request
//! routing (iommufd.md §3.15, §3.19, §4.4).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::driver::{IommuDevice, IommuDriver, PageResponse};
use crate::types::{fault, veventq_type};
use crate::{Errno, ObjectId};

/// `sizeof(struct iommufd_vevent_header)`.
pub const VEVENT_HEADER_SIZE: usize = 8;

#[derive(Debug, Clone)]
enum Vevent {
    Event { seq: u32, data: Box<[u8]> },
    Lost { seq: u32 },
}

#[derive(Debug)]
struct VeventState {
    deliver: VecDeque<Vevent>,
    num_events: u32,
    depth: u32,
    sequence: u32,
}

/// The queue of one vEVENTQ object, shared with the vIOMMU (drivers push through
/// [`crate::ViommuCore::report_event`]) and read through the vEVENTQ fd.
#[derive(Debug)]
pub struct VeventqShared {
    state: Mutex<VeventState>,
}

impl VeventqShared {
    pub(crate) fn new(depth: u32) -> Self {
        VeventqShared {
            state: Mutex::new(VeventState {
                deliver: VecDeque::new(),
                num_events: 0,
                depth,
                sequence: 0,
            }),
        }
    }

    /// Enqueue (`iommufd_viommu_report_event` + `iommufd_vevent_handler`): with `depth`
    /// events queued the LOST_EVENTS marker is (re)placed at the tail instead; a marker at the
    /// tail is removed whenever a new record is added; every record, the marker included,
    /// takes the next 31-bit sequence number.
    pub(crate) fn push(&self, payload: &[u8]) {
        let mut s = self.state.lock();
        let seq = s.sequence;
        let rec = if s.num_events == s.depth {
            Vevent::Lost { seq }
        } else {
            s.num_events += 1;
            Vevent::Event {
                seq,
                data: payload.into(),
            }
        };
        if matches!(s.deliver.back(), Some(Vevent::Lost { .. })) {
            s.deliver.pop_back();
        }
        s.deliver.push_back(rec);
        s.sequence = seq.wrapping_add(1) & i32::MAX as u32;
    }

    /// `read()` on the vEVENTQ fd: whole records `{flags, sequence}` + payload, back to back,
    /// while the next one fits in `buf`. Returns the bytes written (0 when empty or when the
    /// first record does not fit).
    pub(crate) fn read(&self, buf: &mut [u8]) -> usize {
        let mut s = self.state.lock();
        let mut done = 0usize;
        while let Some(rec) = s.deliver.front() {
            let (flags, seq, data): (u32, u32, &[u8]) = match rec {
                Vevent::Event { seq, data } => (0, *seq, data),
                Vevent::Lost { seq } => (veventq_type::FLAG_LOST_EVENTS, *seq, &[]),
            };
            let need = VEVENT_HEADER_SIZE + data.len();
            if buf.len() - done < need {
                break;
            }
            buf[done..done + 4].copy_from_slice(&flags.to_le_bytes());
            buf[done + 4..done + 8].copy_from_slice(&seq.to_le_bytes());
            buf[done + 8..done + need].copy_from_slice(data);
            done += need;
            if matches!(rec, Vevent::Event { .. }) {
                s.num_events -= 1;
            }
            s.deliver.pop_front();
        }
        done
    }

    pub(crate) fn readable(&self) -> bool {
        !self.state.lock().deliver.is_empty()
    }

    pub(crate) fn clear(&self) {
        let mut s = self.state.lock();
        s.deliver.clear();
        s.num_events = 0;
    }
}

/// One page request as a device reports it (`struct iommu_fault_page_request`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// `fault::FLAG_PASID_VALID` | `fault::FLAG_LAST_PAGE`.
    pub flags: u32,
    pub pasid: u32,
    pub grpid: u32,
    /// `fault::PERM_*`.
    pub perm: u32,
    pub addr: u64,
}

impl PageRequest {
    fn pasid(&self) -> Option<u32> {
        (self.flags & fault::FLAG_PASID_VALID != 0).then_some(self.pasid)
    }
}

/// A page-request group waiting in a FAULT queue.
pub(crate) struct FaultGroup {
    dev_id: ObjectId,
    /// The attach handle the group was routed through; detach answers its groups.
    handle: u64,
    faults: Vec<PageRequest>,
    device: Arc<dyn IommuDevice>,
    driver: Arc<dyn IommuDriver>,
}

impl FaultGroup {
    fn respond(&self, code: u32) {
        let Some(last) = self.faults.last() else {
            return;
        };
        self.driver.page_response(
            &self.device,
            &PageResponse {
                pasid: last.pasid(),
                grpid: last.grpid,
                code,
            },
        );
    }
}

#[derive(Default)]
struct FaultState {
    deliver: VecDeque<FaultGroup>,
    response: BTreeMap<u32, FaultGroup>,
}

/// The queue of one FAULT object.
#[derive(Default)]
pub struct FaultShared {
    state: Mutex<FaultState>,
}

impl FaultShared {
    fn push(&self, group: FaultGroup) {
        self.state.lock().deliver.push_back(group);
    }

    /// `read()` on the fault fd (iommufd.md §3.15): `count % 40 != 0` → ESPIPE; whole groups in
    /// FIFO order while they fit, each given a cookie (lowest free ≥ 1) and moved to the
    /// response table.
    pub(crate) fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        if !buf.len().is_multiple_of(fault::RECORD_SIZE) {
            return Err(Errno::ESPIPE);
        }
        let mut s = self.state.lock();
        let mut done = 0usize;
        while let Some(group) = s.deliver.front() {
            let need = group.faults.len() * fault::RECORD_SIZE;
            if done >= buf.len() || need > buf.len() - done {
                break;
            }
            let cookie = (1u32..)
                .find(|c| !s.response.contains_key(c))
                .unwrap_or(u32::MAX);
            for f in &group.faults {
                let rec = &mut buf[done..done + fault::RECORD_SIZE];
                rec[0..4].copy_from_slice(&f.flags.to_le_bytes());
                rec[4..8].copy_from_slice(&group.dev_id.raw().to_le_bytes());
                rec[8..12].copy_from_slice(&f.pasid.to_le_bytes());
                rec[12..16].copy_from_slice(&f.grpid.to_le_bytes());
                rec[16..20].copy_from_slice(&f.perm.to_le_bytes());
                rec[20..24].fill(0);
                rec[24..32].copy_from_slice(&f.addr.to_le_bytes());
                rec[32..36].fill(0); // length: always 0
                rec[36..40].copy_from_slice(&cookie.to_le_bytes());
                done += fault::RECORD_SIZE;
            }
            if let Some(group) = s.deliver.pop_front() {
                s.response.insert(cookie, group);
            }
        }
        Ok(done)
    }

    /// `write()` on the fault fd: `count % 8 != 0` → ESPIPE; each `{cookie, code}` answers a
    /// delivered group (code not SUCCESS/INVALID → EINVAL, unknown cookie → EINVAL). Returns
    /// the bytes consumed, or the error if none were.
    pub(crate) fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        if !buf.len().is_multiple_of(fault::RESPONSE_SIZE) {
            return Err(Errno::ESPIPE);
        }
        let mut done = 0usize;
        let mut err = None;
        for chunk in buf.chunks_exact(fault::RESPONSE_SIZE) {
            let cookie = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let code = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            if code != fault::RESP_SUCCESS && code != fault::RESP_INVALID {
                err = Some(Errno::EINVAL);
                break;
            }
            let group = self.state.lock().response.remove(&cookie);
            let Some(group) = group else {
                err = Some(Errno::EINVAL);
                break;
            };
            group.respond(code);
            done += fault::RESPONSE_SIZE;
        }
        match err {
            Some(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }

    pub(crate) fn readable(&self) -> bool {
        !self.state.lock().deliver.is_empty()
    }

    /// Answer INVALID every group routed through attach `handle` (detach/replace).
    pub(crate) fn auto_respond_handle(&self, handle: u64) {
        let taken: Vec<FaultGroup> = {
            let mut s = self.state.lock();
            let mut taken = Vec::new();
            let mut keep = VecDeque::new();
            for g in s.deliver.drain(..) {
                if g.handle == handle {
                    taken.push(g);
                } else {
                    keep.push_back(g);
                }
            }
            s.deliver = keep;
            let cookies: Vec<u32> = s
                .response
                .iter()
                .filter(|(_, g)| g.handle == handle)
                .map(|(c, _)| *c)
                .collect();
            for c in cookies {
                if let Some(g) = s.response.remove(&c) {
                    taken.push(g);
                }
            }
            taken
        };
        for g in taken {
            g.respond(fault::RESP_INVALID);
        }
    }

    /// Answer INVALID every pending group (object destroy).
    pub(crate) fn auto_respond_all(&self) {
        let taken: Vec<FaultGroup> = {
            let mut s = self.state.lock();
            let mut v: Vec<FaultGroup> = s.deliver.drain(..).collect();
            v.extend(std::mem::take(&mut s.response).into_values());
            v
        };
        for g in taken {
            g.respond(fault::RESP_INVALID);
        }
    }

    /// Groups queued plus groups awaiting a response.
    pub(crate) fn pending(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.deliver.len(), s.response.len())
    }
}

/// Where one attachment of a device routes page requests.
#[derive(Clone)]
pub(crate) struct RouteEntry {
    pub(crate) handle: u64,
    pub(crate) nested: bool,
    pub(crate) fault: Option<Arc<FaultShared>>,
}

/// Per-device routing state, updated by the core on attach/replace/detach.
pub(crate) struct FaultRoute {
    pub(crate) dev_id: ObjectId,
    pub(crate) device: Arc<dyn IommuDevice>,
    pub(crate) driver: Arc<dyn IommuDriver>,
    pub(crate) attaches: BTreeMap<u32, RouteEntry>,
    partial: Vec<PageRequest>,
    pub(crate) bound: bool,
}

impl FaultRoute {
    pub(crate) fn new(
        dev_id: ObjectId,
        device: Arc<dyn IommuDevice>,
        driver: Arc<dyn IommuDriver>,
    ) -> Self {
        FaultRoute {
            dev_id,
            device,
            driver,
            attaches: BTreeMap::new(),
            partial: Vec::new(),
            bound: true,
        }
    }
}

pub(crate) fn route_page_request(route: &Mutex<FaultRoute>, req: PageRequest) {
    let mut r = route.lock();
    // iommufd.md §4.4: the HWPT attached on the PASID; failing that, with a user-owned PASID
    // table, the RID attachment if it is nested; requests without PASID_VALID go to the RID.
    let target = match req.pasid() {
        None => r.attaches.get(&crate::NO_PASID).cloned(),
        Some(p) => r.attaches.get(&p).cloned().or_else(|| {
            r.attaches
                .get(&crate::NO_PASID)
                .filter(|e| e.nested && r.driver.user_pasid_table())
                .cloned()
        }),
    };
    let target = target
        .filter(|_| r.bound)
        .and_then(|e| e.fault.map(|f| (e.handle, f)));
    let last = req.flags & fault::FLAG_LAST_PAGE != 0;
    let Some((handle, queue)) = target else {
        // No handler: a last-page request is answered INVALID, a partial one dropped.
        drop_partials(&mut r, req.grpid);
        if last {
            let (dev, drv) = (Arc::clone(&r.device), Arc::clone(&r.driver));
            drop(r);
            drv.page_response(
                &dev,
                &PageResponse {
                    pasid: req.pasid(),
                    grpid: req.grpid,
                    code: fault::RESP_INVALID,
                },
            );
        }
        return;
    };
    if !last {
        r.partial.push(req);
        return;
    }
    let mut faults: Vec<PageRequest> = Vec::new();
    r.partial.retain(|p| {
        if p.grpid == req.grpid {
            faults.push(*p);
            false
        } else {
            true
        }
    });
    faults.push(req);
    queue.push(FaultGroup {
        dev_id: r.dev_id,
        handle,
        faults,
        device: Arc::clone(&r.device),
        driver: Arc::clone(&r.driver),
    });
}

fn drop_partials(r: &mut FaultRoute, grpid: u32) {
    r.partial.retain(|p| p.grpid != grpid);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(buf: &[u8], at: usize) -> (u32, u32) {
        (
            u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()),
            u32::from_le_bytes(buf[at + 4..at + 8].try_into().unwrap()),
        )
    }

    #[test]
    fn vevent_overflow_places_lost_marker_at_tail() {
        let q = VeventqShared::new(2);
        q.push(&[1, 0, 0, 0]);
        q.push(&[2, 0, 0, 0]);
        q.push(&[3, 0, 0, 0]); // lost, seq 2
        q.push(&[4, 0, 0, 0]); // lost again, replaces the marker, seq 3
        let mut buf = [0u8; 64];
        let n = q.read(&mut buf);
        assert_eq!(n, 12 + 12 + 8);
        assert_eq!(rec(&buf, 0), (0, 0));
        assert_eq!(buf[8], 1);
        assert_eq!(rec(&buf, 12), (0, 1));
        assert_eq!(rec(&buf, 24), (1, 3));
        assert!(!q.readable());
        // After reading, new events queue normally and the sequence goes on.
        q.push(&[5, 0, 0, 0]);
        assert_eq!(q.read(&mut buf), 12);
        assert_eq!(rec(&buf, 0), (0, 4));
    }

    #[test]
    fn vevent_read_stops_when_a_record_does_not_fit() {
        let q = VeventqShared::new(4);
        q.push(&[1, 0, 0, 0]);
        q.push(&[2, 0, 0, 0]);
        let mut buf = [0u8; 20];
        assert_eq!(q.read(&mut buf[..11]), 0);
        assert_eq!(q.read(&mut buf), 12);
        assert_eq!(q.read(&mut buf), 12);
        assert_eq!(q.read(&mut buf), 0);
    }

    #[test]
    fn vevent_sequence_wraps_at_31_bits() {
        let q = VeventqShared::new(8);
        q.state.lock().sequence = i32::MAX as u32;
        q.push(&[]);
        q.push(&[]);
        let mut buf = [0u8; 16];
        assert_eq!(q.read(&mut buf), 16);
        assert_eq!(rec(&buf, 0).1, i32::MAX as u32);
        assert_eq!(rec(&buf, 8).1, 0);
    }

    #[test]
    fn a_lost_marker_not_read_is_dropped_by_the_next_event() {
        let q = VeventqShared::new(1);
        q.push(&[1]);
        q.push(&[2]); // lost marker, seq 1
        let mut buf = [0u8; 9];
        assert_eq!(q.read(&mut buf), 9); // event 0 only; marker does not fit? it does: 8 bytes
        q.push(&[3]); // removes the marker (at tail), queues seq 2
        let mut all = [0u8; 64];
        let n = q.read(&mut all);
        assert_eq!(n, 9);
        assert_eq!(rec(&all, 0), (0, 2));
    }
}
