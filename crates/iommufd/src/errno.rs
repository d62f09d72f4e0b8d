//! The error type at the iommufd boundary: a kernel errno value.
//!
//! Every operation of this crate fails with exactly the errno the kernel's iommufd returns for
//! the same request (iommufd.md §3, §10), so the ABI layer only has to negate it.

use std::fmt;

/// A Linux errno value (asm-generic numbering, as on arm64 and x86-64).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
#[repr(i32)]
pub enum Errno {
    EPERM = 1,
    ENOENT = 2,
    EIO = 5,
    ENXIO = 6,
    E2BIG = 7,
    EBADF = 9,
    ENOMEM = 12,
    EFAULT = 14,
    EBUSY = 16,
    EEXIST = 17,
    ENODEV = 19,
    EINVAL = 22,
    ENOTTY = 25,
    ENOSPC = 28,
    ESPIPE = 29,
    ERANGE = 34,
    /// Also spelled EDEADLOCK on Linux (same value on arm64 and x86-64).
    EDEADLK = 35,
    EBADE = 52,
    EOVERFLOW = 75,
    EBADFD = 77,
    EMSGSIZE = 90,
    EOPNOTSUPP = 95,
    EADDRINUSE = 98,
    /// A driver's command queue did not complete (arm-smmu-v3's CMD_SYNC timeout).
    ETIMEDOUT = 110,
}

impl Errno {
    /// Every value, for table-driven code.
    pub const ALL: [Errno; 24] = [
        Errno::EPERM,
        Errno::ENOENT,
        Errno::EIO,
        Errno::ENXIO,
        Errno::E2BIG,
        Errno::EBADF,
        Errno::ENOMEM,
        Errno::EFAULT,
        Errno::EBUSY,
        Errno::EEXIST,
        Errno::ENODEV,
        Errno::EINVAL,
        Errno::ENOTTY,
        Errno::ENOSPC,
        Errno::ESPIPE,
        Errno::ERANGE,
        Errno::EDEADLK,
        Errno::EBADE,
        Errno::EOVERFLOW,
        Errno::EBADFD,
        Errno::EMSGSIZE,
        Errno::EOPNOTSUPP,
        Errno::EADDRINUSE,
        Errno::ETIMEDOUT,
    ];

    /// The positive errno number (what `errno` holds after a failed syscall).
    pub const fn raw(self) -> i32 {
        self as i32
    }

    /// The errno for a raw value, if it is one this crate produces.
    pub fn from_raw(raw: i32) -> Option<Errno> {
        Errno::ALL.into_iter().find(|e| e.raw() == raw)
    }

    /// The symbolic name, e.g. "EADDRINUSE".
    pub const fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::EIO => "EIO",
            Errno::ENXIO => "ENXIO",
            Errno::E2BIG => "E2BIG",
            Errno::EBADF => "EBADF",
            Errno::ENOMEM => "ENOMEM",
            Errno::EFAULT => "EFAULT",
            Errno::EBUSY => "EBUSY",
            Errno::EEXIST => "EEXIST",
            Errno::ENODEV => "ENODEV",
            Errno::EINVAL => "EINVAL",
            Errno::ENOTTY => "ENOTTY",
            Errno::ENOSPC => "ENOSPC",
            Errno::ESPIPE => "ESPIPE",
            Errno::ERANGE => "ERANGE",
            Errno::EDEADLK => "EDEADLK",
            Errno::EBADE => "EBADE",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::EBADFD => "EBADFD",
            Errno::EMSGSIZE => "EMSGSIZE",
            Errno::EOPNOTSUPP => "EOPNOTSUPP",
            Errno::EADDRINUSE => "EADDRINUSE",
            Errno::ETIMEDOUT => "ETIMEDOUT",
        }
    }

    /// The strerror() text of glibc for this value.
    pub const fn description(self) -> &'static str {
        match self {
            Errno::EPERM => "Operation not permitted",
            Errno::ENOENT => "No such file or directory",
            Errno::EIO => "Input/output error",
            Errno::ENXIO => "No such device or address",
            Errno::E2BIG => "Argument list too long",
            Errno::EBADF => "Bad file descriptor",
            Errno::ENOMEM => "Cannot allocate memory",
            Errno::EFAULT => "Bad address",
            Errno::EBUSY => "Device or resource busy",
            Errno::EEXIST => "File exists",
            Errno::ENODEV => "No such device",
            Errno::EINVAL => "Invalid argument",
            Errno::ENOTTY => "Inappropriate ioctl for device",
            Errno::ENOSPC => "No space left on device",
            Errno::ESPIPE => "Illegal seek",
            Errno::ERANGE => "Numerical result out of range",
            Errno::EDEADLK => "Resource deadlock avoided",
            Errno::EBADE => "Invalid exchange",
            Errno::EOVERFLOW => "Value too large for defined data type",
            Errno::EBADFD => "File descriptor in bad state",
            Errno::EMSGSIZE => "Message too long",
            Errno::EOPNOTSUPP => "Operation not supported",
            Errno::EADDRINUSE => "Address already in use",
            Errno::ETIMEDOUT => "Connection timed out",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.description())
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_linux_ones() {
        // asm-generic/errno-base.h and errno.h
        assert_eq!(Errno::ENOENT.raw(), 2);
        assert_eq!(Errno::EFAULT.raw(), 14);
        assert_eq!(Errno::EBUSY.raw(), 16);
        assert_eq!(Errno::EINVAL.raw(), 22);
        assert_eq!(Errno::ENOTTY.raw(), 25);
        assert_eq!(Errno::EDEADLK.raw(), 35);
        assert_eq!(Errno::EBADE.raw(), 52);
        assert_eq!(Errno::EOVERFLOW.raw(), 75);
        assert_eq!(Errno::EBADFD.raw(), 77);
        assert_eq!(Errno::EMSGSIZE.raw(), 90);
        assert_eq!(Errno::EOPNOTSUPP.raw(), 95);
        assert_eq!(Errno::EADDRINUSE.raw(), 98);
        assert_eq!(Errno::ETIMEDOUT.raw(), 110);
    }

    #[test]
    fn raw_round_trips_and_displays() {
        for e in Errno::ALL {
            assert_eq!(Errno::from_raw(e.raw()), Some(e));
        }
        assert_eq!(Errno::from_raw(0), None);
        assert_eq!(
            Errno::EADDRINUSE.to_string(),
            "EADDRINUSE (Address already in use)"
        );
    }
}
