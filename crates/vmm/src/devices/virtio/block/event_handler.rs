//! virtio-blk's event-loop glue: a queue notification serves the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.core.queue_events()[0], EventSet::IN)) {
            eprintln!(
                "cloude-vmm: virtio-blk {} cannot watch its queue: {e:?}",
                self.disk.name
            );
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.on_queue_event();
    }
}
