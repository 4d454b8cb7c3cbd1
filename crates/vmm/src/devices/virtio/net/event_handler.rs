//! virtio-net's event-loop glue: queue notifications and tap readiness drive TX and RX.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{Net, DATA_TAP, RXQ, TXQ};

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.core.queue_events().iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                eprintln!("cloude-vmm: virtio-net cannot watch queue {i}: {err:?}");
            }
        }
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Err(err) = ops.add(Events::with_data(&self.tap, DATA_TAP, set)) {
            eprintln!("cloude-vmm: virtio-net cannot watch the tap: {err:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut tx = Ok(0);
        match events.data() {
            d if d == TXQ as u32 => {
                self.core.take_kick(TXQ);
                tx = self.process_tx();
            }
            d if d == RXQ as u32 => {
                self.core.take_kick(RXQ);
            }
            _ => {}
        }
        let served = tx.and_then(|t| self.process_rx().map(|r| t + r));
        self.core.complete("virtio-net", served);
    }
}
