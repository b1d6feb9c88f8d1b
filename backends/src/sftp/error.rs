//! SSH and SFTP errors, classified into [`ErrorKind`]s.
//!
//! A refused or reset connection, a timeout or a connection lost mid-way is
//! [`ErrorKind::Transient`]; SFTP's "no such file" [`ErrorKind::NotFound`]; "permission
//! denied" [`ErrorKind::Permission`], as is a server key russh refuses. (A bad address or an
//! unreadable key file is [`ErrorKind::Config`], when the backend is opened.)

use std::io;

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::StatusCode;

use crate::{BackendError, ErrorKind};

pub(super) fn ssh_error(op: &'static str, key: &str, e: russh::Error) -> BackendError {
    use russh::Error as E;
    let kind = match &e {
        E::IO(io) => BackendError::io(op, key, io::Error::from(io.kind())).kind,
        E::Disconnect
        | E::HUP
        | E::ConnectionTimeout
        | E::KeepaliveTimeout
        | E::InactivityTimeout
        | E::SendError
        | E::RecvError
        | E::Elapsed(_) => ErrorKind::Transient,
        E::UnknownKey | E::WrongServerSig => ErrorKind::Permission,
        _ => ErrorKind::Other,
    };
    BackendError::new(kind, op, key, format!("SSH: {e}"))
}

pub(super) fn sftp_error(op: &'static str, key: &str, e: SftpError) -> BackendError {
    let kind = match &e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => ErrorKind::NotFound,
            StatusCode::PermissionDenied => ErrorKind::Permission,
            StatusCode::NoConnection | StatusCode::ConnectionLost => ErrorKind::Transient,
            _ => ErrorKind::Other,
        },
        SftpError::IO(_) | SftpError::Timeout => ErrorKind::Transient,
        // A closed channel shows as "session closed" or a dropped request.
        SftpError::UnexpectedBehavior(_) => ErrorKind::Transient,
        SftpError::Limited(_) | SftpError::UnexpectedPacket => ErrorKind::Other,
    };
    let message = match &e {
        SftpError::Status(st) => {
            let code = st.status_code.to_string();
            if st.error_message.is_empty() || st.error_message.eq_ignore_ascii_case(&code) {
                format!("SFTP: {code}")
            } else {
                format!("SFTP: {code} ({})", st.error_message)
            }
        }
        e => format!("SFTP: {e}"),
    };
    BackendError::new(kind, op, key, message)
}

pub(super) fn is_status(e: &SftpError, code: StatusCode) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == code)
}
