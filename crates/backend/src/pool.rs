//! The warm pool: VMs booted ahead of requests for chosen languages. Each pooled VM is handed to
//! exactly one request and powers off after answering it, like any other — a VM is never reused;
//! the pool only moves the boot off the request's path. Off unless `[pool] size > 0`.
//!
//! Refilling is driven by demand and start-up, never by a timer: after a VM is taken (and once at
//! start) the executor boots what is missing. A failed boot is not retried until the next take,
//! so a broken image cannot spin.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::vm::Vm;

#[derive(Default)]
struct State {
    ready: HashMap<String, VecDeque<Vm>>,
    booting: HashMap<String, usize>,
    closed: bool,
}

/// Ready VMs by language name.
pub struct Pool {
    size: usize,
    languages: Vec<String>,
    state: Mutex<State>,
}

impl Pool {
    /// `size` ready VMs for each language in `languages` (`"*"` for all).
    pub fn new(size: usize, languages: Vec<String>) -> Self {
        Pool {
            size,
            languages,
            state: Mutex::new(State::default()),
        }
    }

    /// A pool that never holds anything.
    pub fn off() -> Self {
        Self::new(0, Vec::new())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("pool lock is never poisoned")
    }

    /// Whether `language` is kept warm.
    pub fn wants(&self, language: &str) -> bool {
        self.size > 0 && self.languages.iter().any(|l| l == "*" || l == language)
    }

    /// Takes a ready VM for `language` whose hypervisor is still running.
    pub fn take(&self, language: &str) -> Option<Vm> {
        loop {
            let mut vm = self.lock().ready.get_mut(language)?.pop_front()?;
            if vm.running() {
                return Some(vm);
            }
            tracing::warn!(cid = vm.cid(), "a pooled VM had stopped; discarding it");
        }
    }

    /// Reserves the boots needed to bring `language` back to full size; returns how many.
    pub fn reserve(&self, language: &str) -> usize {
        if !self.wants(language) {
            return 0;
        }
        let mut st = self.lock();
        if st.closed {
            return 0;
        }
        let have = st.ready.get(language).map_or(0, VecDeque::len)
            + st.booting.get(language).copied().unwrap_or(0);
        let need = self.size.saturating_sub(have);
        *st.booting.entry(language.to_string()).or_default() += need;
        need
    }

    /// A reserved boot finished: keeps `vm` (or drops it, killing it, once the pool is closed).
    pub fn put(&self, language: &str, vm: Option<Vm>) {
        let mut st = self.lock();
        if let Some(n) = st.booting.get_mut(language) {
            *n = n.saturating_sub(1);
        }
        if let Some(vm) = vm {
            if st.closed {
                drop(st);
                drop(vm);
                return;
            }
            st.ready
                .entry(language.to_string())
                .or_default()
                .push_back(vm);
        }
    }

    /// VMs ready now, over all languages.
    pub fn ready(&self) -> usize {
        self.lock().ready.values().map(VecDeque::len).sum()
    }

    /// Stops refilling and kills every pooled VM (shutdown). Returns how many were dropped.
    pub fn close(&self) -> usize {
        let drained: Vec<Vm> = {
            let mut st = self.lock();
            st.closed = true;
            st.ready.drain().flat_map(|(_, q)| q).collect()
        };
        drained.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_track_size_and_close() {
        let p = Pool::new(2, vec!["python".into()]);
        assert!(p.wants("python") && !p.wants("bash"));
        assert_eq!(p.reserve("bash"), 0);
        assert_eq!(p.reserve("python"), 2);
        assert_eq!(p.reserve("python"), 0, "already booting");
        p.put("python", None);
        assert_eq!(
            p.reserve("python"),
            1,
            "a failed boot frees its reservation"
        );
        assert!(p.take("python").is_none());
        assert_eq!(p.close(), 0);
        assert_eq!(p.reserve("python"), 0, "closed");
        let all = Pool::new(1, vec!["*".into()]);
        assert!(all.wants("anything"));
        assert!(!Pool::off().wants("python"));
    }
}
