//! What the watchdog knows and when it must act: a pure table of watched
//! tasks with their deadlines. Time is an input (nanoseconds of
//! `CLOCK_MONOTONIC`), so that a test drives it without a clock.

/// The watchdog holds no more tasks than this: a worker that sends
/// garbage cannot make it grow without bound. Far above what one machine
/// runs at once.
pub const MAX_TASKS: usize = 1 << 14;

/// What to do to a task now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Its deadline is `grace` away: ask it to stop.
    Term,
    /// Its deadline has come: it must be gone.
    Kill,
}

/// How far a task has been taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Watching,
    Termed,
    Killed,
}

#[derive(Debug)]
struct Entry<T> {
    id: u64,
    /// Until when its lease is confirmed.
    until: u64,
    grace: u64,
    stage: Stage,
    target: T,
}

/// The watched tasks, each with what the caller needs to signal it (`T`).
#[derive(Debug)]
pub struct Table<T> {
    /// Until when the worker's advert is confirmed: every task must be
    /// gone by then too (the coordinator gives up a worker whose advert
    /// lapsed).
    advert: Option<u64>,
    /// Few enough to scan: a machine runs tens of tasks, not thousands.
    tasks: Vec<Entry<T>>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            advert: None,
            tasks: Vec::new(),
        }
    }
}

impl<T> Table<T> {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The advert is confirmed until `until`. Only ever moves later: a
    /// confirmation that arrives late says nothing new.
    pub fn advert(&mut self, until: u64) {
        self.advert = Some(self.advert.map_or(until, |a| a.max(until)));
    }

    /// Watches task `id`, whose lease is confirmed until `until`, to be
    /// asked to stop `grace` before its deadline. A task watched again
    /// (the same id) is replaced. Returns false (and watches nothing) when
    /// the table is full.
    pub fn watch(&mut self, id: u64, until: u64, grace: u64, target: T) -> bool {
        if let Some(e) = self.tasks.iter_mut().find(|e| e.id == id) {
            *e = Entry {
                id,
                until,
                grace,
                stage: Stage::Watching,
                target,
            };
            return true;
        }
        if self.tasks.len() >= MAX_TASKS {
            return false;
        }
        self.tasks.push(Entry {
            id,
            until,
            grace,
            stage: Stage::Watching,
            target,
        });
        true
    }

    /// Task `id`'s lease is confirmed until `until` (later only). A task
    /// already asked to stop is not spared: the stop is under way, and
    /// only its kill moves with the deadline.
    pub fn lease(&mut self, id: u64, until: u64) {
        if let Some(e) = self.tasks.iter_mut().find(|e| e.id == id) {
            e.until = e.until.max(until);
        }
    }

    /// Forgets task `id` (it ended): its target and whether it was
    /// signalled, if it was watched.
    pub fn forget(&mut self, id: u64) -> Option<(T, bool)> {
        let i = self.tasks.iter().position(|e| e.id == id)?;
        let e = self.tasks.swap_remove(i);
        Some((e.target, e.stage != Stage::Watching))
    }

    fn deadline(&self, e: &Entry<T>) -> u64 {
        self.advert.map_or(e.until, |a| a.min(e.until))
    }

    fn due_at(&self, e: &Entry<T>) -> Option<u64> {
        let deadline = self.deadline(e);
        match e.stage {
            Stage::Watching => Some(deadline.saturating_sub(e.grace)),
            Stage::Termed => Some(deadline),
            Stage::Killed => None,
        }
    }

    /// When something is next due, if anything is.
    pub fn next_due(&self) -> Option<u64> {
        self.tasks.iter().filter_map(|e| self.due_at(e)).min()
    }

    /// What is due at `now`, each task advanced past it. A task whose
    /// deadline has come without its stop begun is killed at once.
    pub fn due(&mut self, now: u64) -> Vec<(Act, &mut T)> {
        let advert = self.advert;
        let mut acts = Vec::new();
        for e in &mut self.tasks {
            let deadline = advert.map_or(e.until, |a| a.min(e.until));
            let act = match e.stage {
                Stage::Killed => continue,
                _ if now >= deadline => Act::Kill,
                Stage::Watching if now >= deadline.saturating_sub(e.grace) => Act::Term,
                _ => continue,
            };
            e.stage = match act {
                Act::Term => Stage::Termed,
                Act::Kill => Stage::Killed,
            };
            acts.push((act, &mut e.target));
        }
        acts
    }

    /// Every task, marked killed: the worker is gone, and nobody is left
    /// to renew their leases or stop them.
    pub fn kill_all(&mut self) -> Vec<&mut T> {
        for e in &mut self.tasks {
            e.stage = Stage::Killed;
        }
        self.tasks.iter_mut().map(|e| &mut e.target).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn acts(t: &mut Table<&'static str>, now: u64) -> Vec<(Act, &'static str)> {
        let mut v: Vec<_> = t.due(now).into_iter().map(|(a, n)| (a, *n)).collect();
        v.sort_by_key(|(_, n)| *n);
        v
    }

    #[test]
    fn a_task_is_termed_a_grace_before_its_deadline_and_killed_at_it() {
        let mut t = Table::default();
        assert!(t.watch(1, 10 * S, 2 * S, "a"));
        assert_eq!(t.next_due(), Some(8 * S));
        assert_eq!(acts(&mut t, 8 * S - 1), vec![]);
        assert_eq!(acts(&mut t, 8 * S), vec![(Act::Term, "a")]);
        assert_eq!(acts(&mut t, 9 * S), vec![], "termed once");
        assert_eq!(t.next_due(), Some(10 * S));
        assert_eq!(acts(&mut t, 10 * S), vec![(Act::Kill, "a")]);
        assert_eq!(t.next_due(), None);
        assert_eq!(acts(&mut t, 100 * S), vec![], "killed once");
        assert_eq!(t.forget(1), Some(("a", true)));
        assert!(t.is_empty());
    }

    #[test]
    fn renewals_move_the_deadline_and_a_late_one_changes_nothing() {
        let mut t = Table::default();
        t.watch(1, 10 * S, S, "a");
        t.lease(1, 20 * S);
        t.lease(1, 15 * S);
        assert_eq!(t.next_due(), Some(19 * S));
        assert_eq!(acts(&mut t, 18 * S), vec![]);
        // Renewals of a task nobody watches are nothing.
        t.lease(7, 5 * S);
        assert_eq!(t.forget(1), Some(("a", false)), "never signalled");
        assert_eq!(t.forget(1), None);
    }

    #[test]
    fn the_advert_bounds_every_task() {
        let mut t = Table::default();
        t.watch(1, 30 * S, S, "a");
        t.watch(2, 5 * S, S, "b");
        t.advert(10 * S);
        t.advert(8 * S);
        assert_eq!(t.next_due(), Some(4 * S));
        assert_eq!(
            acts(&mut t, 9 * S),
            vec![(Act::Term, "a"), (Act::Kill, "b")]
        );
        // A renewed advert moves a's kill, not its stop.
        t.advert(40 * S);
        assert_eq!(t.next_due(), Some(30 * S));
        assert_eq!(acts(&mut t, 29 * S), vec![]);
        assert_eq!(acts(&mut t, 30 * S), vec![(Act::Kill, "a")]);
    }

    #[test]
    fn a_deadline_already_past_kills_at_once() {
        let mut t = Table::default();
        t.watch(1, 10 * S, 3 * S, "a");
        assert_eq!(acts(&mut t, 11 * S), vec![(Act::Kill, "a")]);
        // A grace longer than the time since the clock began.
        t.watch(2, S, 5 * S, "b");
        assert_eq!(t.next_due(), Some(0));
    }

    #[test]
    fn watched_again_a_task_starts_over_and_the_table_is_bounded() {
        let mut t = Table::default();
        t.watch(1, 10 * S, S, "a");
        acts(&mut t, 10 * S);
        t.watch(1, 20 * S, S, "a2");
        assert_eq!(t.len(), 1);
        assert_eq!(acts(&mut t, 19 * S), vec![(Act::Term, "a2")]);
        let mut big = Table::default();
        for i in 0..MAX_TASKS as u64 {
            assert!(big.watch(i, S, 0, ()));
        }
        assert!(!big.watch(u64::MAX, S, 0, ()));
        assert!(big.watch(3, S, 0, ()), "a known id still fits");
    }

    #[test]
    fn when_the_worker_is_gone_every_task_is_killed_once() {
        let mut t = Table::default();
        t.watch(1, 10 * S, S, "a");
        t.watch(2, 20 * S, S, "b");
        let mut all: Vec<_> = t.kill_all().into_iter().map(|n| *n).collect();
        all.sort();
        assert_eq!(all, vec!["a", "b"]);
        assert_eq!(t.next_due(), None);
        assert_eq!(acts(&mut t, 100 * S), vec![]);
    }
}
