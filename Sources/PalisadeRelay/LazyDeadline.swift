import NIOCore

/// A deadline that moves with every request but rarely fires (keep-alive
/// idle, request head, body stall). Moving or clearing it only stores a
/// time; at most one task is scheduled, and when it fires early (the
/// deadline moved later meanwhile) it re-arms for the rest. (A NIO task
/// scheduled and cancelled per request costs a heap insert and a
/// linear-scan removal among the loop's scheduled tasks.)
/// Lives on one event loop; not thread-safe.
package final class LazyDeadline {
    private let eventLoop: EventLoop
    /// Dropped at `stop`: it may hold the owner, which holds this.
    private var action: (() -> Void)?
    private var deadline: NIODeadline?
    private var task: Scheduled<Void>?
    private var taskFiresAt = NIODeadline.distantFuture
    private var stopped = false

    /// `action` runs on `eventLoop` once the deadline set last has passed.
    /// It may hold the owner strongly: the owner calls `stop` when it goes.
    package init(on eventLoop: EventLoop, action: @escaping () -> Void) {
        self.eventLoop = eventLoop
        self.action = action
    }

    package var isArmed: Bool { deadline != nil }

    /// Fires `timeout` from now (replacing any earlier setting).
    package func arm(in timeout: TimeAmount) { arm(at: eventLoop.now + timeout) }

    package func arm(at when: NIODeadline) {
        guard !stopped else { return }
        deadline = when
        // A task already due no later than `when` checks again when it fires.
        if task == nil || taskFiresAt > when { schedule(at: when) }
    }

    /// Disarms (a pending task finds nothing to do).
    package func clear() { deadline = nil }

    /// Disarms for good and drops the task (the owner is going away).
    package func stop() {
        stopped = true
        deadline = nil
        action = nil
        task?.cancel()
        task = nil
    }

    private func schedule(at when: NIODeadline) {
        task?.cancel()
        taskFiresAt = when
        // (Held strongly until it fires or `stop` cancels it: a weak
        // reference would give this object a side table, and every retain
        // of it the slow path.)
        task = eventLoop.assumeIsolated().scheduleTask(deadline: when) { self.fired() }
    }

    private func fired() {
        task = nil
        taskFiresAt = .distantFuture
        guard let deadline, !stopped else { return }
        if deadline > eventLoop.now {
            schedule(at: deadline)
            return
        }
        self.deadline = nil
        action?()
    }
}
