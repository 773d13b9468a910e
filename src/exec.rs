//! `katalite exec`: a new process in a running container's VM, started by our init on its
//! own channel stream. The client ([`client`]) reaches the container's supervisor through
//! its control socket; the supervisor's [`Server`] opens the stream and the [`Router`]
//! carries the guest's frames of that stream back to the client.

pub mod client;
mod router;
mod server;

pub use router::Router;
pub use server::Server;
