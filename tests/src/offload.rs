//! Checksum offload of an interface (the ethtool ioctl, so the VM needs no `ethtool`).
//!
//! A veth hands packets on with their transport checksum unfinished (CHECKSUM_PARTIAL) where
//! the sender offloads it, and a receiver in another namespace trusts such a packet without
//! checking. With transmit checksumming off on an interface, the kernel finishes every
//! checksum in software before the packet leaves it, and the receiver verifies what arrives:
//! how tests make a wrong checksum update visible.

use std::os::fd::AsRawFd;

use crate::{Error, Netns, Result, check_ifname};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SRXCSUM: u32 = 0x15;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with its `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _rest: [u8; 16],
}

impl Netns {
    /// Turns transmit (`tx`) and receive (`rx`) checksum offload of `dev` on or off, as
    /// `ethtool -K dev tx … rx …` does (transmit off also turns off segmentation offload,
    /// which needs it).
    pub fn set_checksum_offload(&self, dev: &str, tx: bool, rx: bool) -> Result<()> {
        check_ifname(dev)?;
        let dev = dev.to_owned();
        self.run(move || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")
                .map_err(|source| Error::Io { what: "a socket for the ethtool ioctl".into(), source })?;
            for (cmd, on) in [(ETHTOOL_STXCSUM, tx), (ETHTOOL_SRXCSUM, rx)] {
                let mut value = EthtoolValue { cmd, data: u32::from(on) };
                let mut req = IfreqData { name: [0; libc::IFNAMSIZ], data: &mut value, _rest: [0; 16] };
                req.name[..dev.len()].copy_from_slice(dev.as_bytes());
                // SAFETY: SIOCETHTOOL reads `req` and the ethtool_value it points to; both live
                // across the call.
                #[expect(unsafe_code, reason = "the ethtool ioctl through libc")]
                let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) };
                if rc != 0 {
                    return Err(Error::Io {
                        what: format!("ethtool ioctl {cmd:#x} on {dev}"),
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            Ok(())
        })?
    }
}
