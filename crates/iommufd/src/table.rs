//! The per-context object table (iommufd.md §1.3, §4.1): IDs lowest-free from 1 and reused,
//! reserved until finalised, tombstones, typed lookups and `users` counts.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Errno, ObjectId, ObjectType};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// An object. `users` counts long-term references, the table's own included; an object
    /// not yet `published` (its command is still running) looks up as ENOENT.
    Object {
        ty: ObjectType,
        users: u32,
        published: bool,
    },
    /// Left by a vDEVICE force-destroyed with its device; ID kept until the context goes.
    Tombstone,
}

/// The xarray's `xa_limit_31b`.
const ID_MAX: u32 = i32::MAX as u32;

#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) slots: BTreeMap<u32, Slot>,
    free: BTreeSet<u32>,
    next: u32,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            slots: BTreeMap::new(),
            free: BTreeSet::new(),
            next: 1,
        }
    }
}

impl Table {
    /// Reserve the lowest free ID (xa_alloc returns EBUSY when the 31-bit space is full).
    pub(crate) fn reserve(&mut self, ty: ObjectType) -> Result<ObjectId, Errno> {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                if self.next > ID_MAX {
                    return Err(Errno::EBUSY);
                }
                self.next += 1;
                self.next - 1
            }
        };
        self.slots.insert(
            id,
            Slot::Object {
                ty,
                users: 1,
                published: false,
            },
        );
        Ok(ObjectId(id))
    }

    /// Publish a reserved object.
    pub(crate) fn finalize(&mut self, id: ObjectId) {
        if let Some(Slot::Object { published, .. }) = self.slots.get_mut(&id.0) {
            *published = true;
        }
    }

    /// Forget an ID (abort of a reserved object, or destroy of a live one).
    pub(crate) fn release(&mut self, id: ObjectId) {
        if self.slots.remove(&id.0).is_some() {
            self.free.insert(id.0);
        }
    }

    pub(crate) fn tombstone(&mut self, id: ObjectId) {
        if let Some(slot) = self.slots.get_mut(&id.0) {
            *slot = Slot::Tombstone;
        }
    }

    /// The type of a live (published) object.
    pub(crate) fn type_of(&self, id: ObjectId) -> Option<ObjectType> {
        match self.slots.get(&id.0) {
            Some(Slot::Object {
                ty,
                published: true,
                ..
            }) => Some(*ty),
            _ => None,
        }
    }

    /// Typed lookup: a live object of type `ty`, else ENOENT.
    pub(crate) fn check(&self, id: ObjectId, ty: ObjectType) -> Result<(), Errno> {
        match self.type_of(id) {
            Some(t) if t == ty => Ok(()),
            _ => Err(Errno::ENOENT),
        }
    }

    pub(crate) fn users(&self, id: ObjectId) -> u32 {
        match self.slots.get(&id.0) {
            Some(Slot::Object { users, .. }) => *users,
            _ => 0,
        }
    }

    /// Take a long-term reference.
    pub(crate) fn get(&mut self, id: ObjectId) {
        if let Some(Slot::Object { users, .. }) = self.slots.get_mut(&id.0) {
            *users += 1;
        }
    }

    /// Drop a long-term reference (never the table's own).
    pub(crate) fn put(&mut self, id: ObjectId) {
        if let Some(Slot::Object { users, .. }) = self.slots.get_mut(&id.0) {
            *users = users.saturating_sub(1).max(1);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// All IDs currently present (any state), ascending.
    pub(crate) fn ids(&self) -> Vec<ObjectId> {
        self.slots.keys().map(|&id| ObjectId(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_lowest_free_from_one() {
        let mut t = Table::default();
        let a = t.reserve(ObjectType::Ioas).unwrap();
        let b = t.reserve(ObjectType::Ioas).unwrap();
        let c = t.reserve(ObjectType::Ioas).unwrap();
        assert_eq!((a.0, b.0, c.0), (1, 2, 3));
        t.release(b);
        t.release(a);
        assert_eq!(t.reserve(ObjectType::Ioas).unwrap().0, 1);
        assert_eq!(t.reserve(ObjectType::Ioas).unwrap().0, 2);
        assert_eq!(t.reserve(ObjectType::Ioas).unwrap().0, 4);
    }

    #[test]
    fn reserved_and_tombstones_look_up_as_enoent() {
        let mut t = Table::default();
        let a = t.reserve(ObjectType::Ioas).unwrap();
        assert_eq!(t.check(a, ObjectType::Ioas), Err(Errno::ENOENT));
        t.finalize(a);
        assert_eq!(t.check(a, ObjectType::Ioas), Ok(()));
        assert_eq!(t.check(a, ObjectType::Device), Err(Errno::ENOENT));
        t.tombstone(a);
        assert_eq!(t.check(a, ObjectType::Ioas), Err(Errno::ENOENT));
        assert_eq!(t.reserve(ObjectType::Ioas).unwrap().0, 2);
    }
}
