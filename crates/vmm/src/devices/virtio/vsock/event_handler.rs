//! virtio-vsock's event-loop glue: queue notifications, the host listener and each host
//! connection's readiness.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Vsock, DATA_CONN, DATA_LISTENER, EVQ, RXQ, TXQ};

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.core.queue_events().iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                eprintln!("cloude-vmm: vsock cannot watch queue {i}: {err:?}");
            }
        }
        let l = self.muxer.listener().as_raw_fd();
        if let Err(err) = ops.add(Events::with_data_raw(l, DATA_LISTENER, EventSet::IN)) {
            eprintln!("cloude-vmm: vsock cannot watch its socket: {err:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut tx = Ok(0);
        match events.data() {
            d if d == RXQ as u32 => {
                self.core.take_kick(RXQ);
            }
            d if d == EVQ as u32 => {
                self.core.take_kick(EVQ);
                tx = self.event_queue_kicked();
            }
            d if d == TXQ as u32 => {
                self.core.take_kick(TXQ);
                tx = self.process_tx();
            }
            DATA_LISTENER => self.muxer.accept(),
            _ => self.muxer.on_fd(events.fd(), events.event_set()),
        }
        let served = tx.and_then(|t| self.process_rx().map(|r| t + r));
        self.complete(served);
        self.apply_registrations(ops);
    }
}

impl Vsock {
    /// Watches the host connections the muxer opened and forgets the ones it closed.
    fn apply_registrations(&mut self, ops: &mut EventOps) {
        for s in self.muxer.take_dead() {
            let _ = ops.remove(Events::empty(&s));
        }
        for fd in self.muxer.take_added() {
            let set =
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, DATA_CONN, set)) {
                eprintln!("cloude-vmm: vsock cannot watch a connection: {e:?}");
            }
        }
    }
}
