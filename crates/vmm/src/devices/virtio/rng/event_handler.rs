//! virtio-rng's event-loop glue: a queue notification serves the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Rng;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.core.queue_events()[0], EventSet::IN)) {
            eprintln!("cloude-vmm: virtio-rng cannot watch its queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.core.take_kick(0);
        let served = self.process_queue();
        self.core.complete("virtio-rng", served);
    }
}
