//! Containers without a daemon: state entries under a per-user runtime dir, one
//! supervising katalite process per VM (its control socket and json-file log), and the
//! commands that read and steer them (`ps`, `logs`, `stop`, `kill`, `rm`, `inspect`, `wait`).

pub mod commands;
pub mod control;
pub mod inspect;
pub mod log_thread;
pub mod logfile;
pub mod ps;
pub mod state;
pub mod supervise;
pub mod time;
