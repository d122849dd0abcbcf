import NIOConcurrencyHelpers

/// A weak reference that closures on other threads may hold: for a server
/// whose channel initializers are built in its init, before `self` exists
/// for `[weak self]`, and which must not keep the server alive.
package final class WeakReference<Object: AnyObject & Sendable>: Sendable {
    private struct Weak: Sendable { weak var object: Object? }
    private let value = NIOLockedValueBox(Weak())
    package init() {}
    package var object: Object? { value.withLockedValue { $0.object } }
    package func set(_ object: Object) { value.withLockedValue { $0.object = object } }
}
