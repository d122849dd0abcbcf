import Foundation
import NIOConcurrencyHelpers
import PalisadePolicy

/// What DNS answers taught: for each name, the addresses it resolved to and
/// until when. An address is kept for its TTL (raised to a floor, cut to a
/// cap) plus a grace period, so connections opened just before expiry are
/// not refused; an address several names resolved to keeps all of them.
/// How many addresses one toFQDNs selector may hold is bounded; what would
/// exceed it is refused and counted, never allowed silently.
public final class FQDNCache: Sendable {
    public struct Limits: Sendable, Codable, Equatable {
        public var minTTL: UInt32 = 5
        public var maxTTL: UInt32 = 86_400
        public var graceSeconds: UInt32 = 60
        public var maxAddressesPerSelector = 4096
        public init() {}
    }

    /// One name -> address binding, as saved in STATE/fqdn.json.
    public struct Binding: Codable, Sendable, Equatable {
        public var name: String
        public var address: IPAddress
        /// When the answer's TTL runs out; the address goes `grace` later.
        public var expires: Date
    }

    struct State {
        var byName: [String: [IPAddress: Date]] = [:]
        var namesOf: [IPAddress: Set<String>] = [:]
        var refused = 0
        var version = 0
        /// Addresses whose names all expired, and when: connections opened
        /// while they were valid are not revoked by a later apply.
        var retired: [IPAddress: Date] = [:]
    }

    /// How long an expired address's open connections are left alone (the
    /// conntrack limit of an established TCP flow).
    static let retiredFor: TimeInterval = 6 * 3600
    static let maxRetired = 65536

    public let limits: Limits
    private let state = NIOLockedValueBox(State())

    public init(limits: Limits = Limits()) { self.limits = limits }

    public var version: Int { state.withLockedValue { $0.version } }
    /// Addresses refused because a selector was full.
    public var refused: Int { state.withLockedValue { $0.refused } }
    public var addressCount: Int { state.withLockedValue { $0.namesOf.count } }

    /// Records an answer: each (address, ttl) under every name. Returns the
    /// addresses whose set of names changed, with their new set, and those
    /// refused because a selector in `selectors` would exceed its bound.
    public func record(names: Set<String>, addresses: [(IPAddress, UInt32)], selectors: [FQDNSelector], now: Date = Date())
        -> (changed: LearnedNames, refused: [IPAddress]) {
        let names = Set(names.map(FQDNSelector.normalize))
        let limits = self.limits
        return state.withLockedValue { s in
            var changed: LearnedNames = [:]
            var refused: [IPAddress] = []
            let matching = selectors.filter { sel in names.contains { sel.matches($0) } }
            for (a, ttl) in addresses {
                let ttl = TimeInterval(min(max(ttl, limits.minTTL), limits.maxTTL))
                let expires = now.addingTimeInterval(ttl)
                let before = s.namesOf[a] ?? []
                if before.isEmpty {
                    // A new address: every selector it would join must have room.
                    let full = matching.contains { sel in
                        s.namesOf.values.lazy.filter { ns in ns.contains { sel.matches($0) } }.count >= limits.maxAddressesPerSelector
                    }
                    if full { refused.append(a); s.refused += 1; continue }
                }
                for n in names {
                    let old = s.byName[n]?[a]
                    if old == nil || old! < expires { s.byName[n, default: [:]][a] = expires }
                }
                let after = before.union(names)
                s.namesOf[a] = after
                s.retired[a] = nil
                if after != before { changed[a] = after }
            }
            if !changed.isEmpty { s.version += 1 }
            return (changed, refused)
        }
    }

    /// Drops bindings past expiry + grace. Returns the addresses whose names
    /// changed, with what is left (an empty set: the address is gone).
    public func expire(now: Date = Date()) -> LearnedNames {
        let grace = TimeInterval(limits.graceSeconds)
        return state.withLockedValue { s in
            var changed: LearnedNames = [:]
            for (name, addrs) in s.byName {
                for (a, expires) in addrs where expires.addingTimeInterval(grace) <= now {
                    s.byName[name]?[a] = nil
                    s.namesOf[a]?.remove(name)
                    changed[a] = s.namesOf[a] ?? []
                }
                if s.byName[name]?.isEmpty == true { s.byName[name] = nil }
            }
            for (a, names) in changed where names.isEmpty {
                s.namesOf[a] = nil
                s.retired[a] = now
            }
            s.retired = s.retired.filter { now.timeIntervalSince($0.value) < FQDNCache.retiredFor }
            if s.retired.count > FQDNCache.maxRetired {
                s.retired = Dictionary(uniqueKeysWithValues: s.retired.sorted { $0.value > $1.value }.prefix(FQDNCache.maxRetired).map { ($0.key, $0.value) })
            }
            if !changed.isEmpty { s.version += 1 }
            return changed
        }
    }

    /// Addresses that expired recently (see State.retired).
    public func retiredAddresses() -> Set<IPAddress> { state.withLockedValue { Set($0.retired.keys) } }

    /// Every learned address and its names (what the compiler takes).
    public func snapshot() -> LearnedNames { state.withLockedValue { $0.namesOf } }

    public func bindings() -> [Binding] {
        state.withLockedValue { s in
            s.byName.flatMap { name, addrs in addrs.map { Binding(name: name, address: $0.key, expires: $0.value) } }
                .sorted { ($0.name, $0.address) < ($1.name, $1.address) }
        }
    }

    /// Takes bindings saved by a previous run (those not yet past grace).
    public func restore(_ saved: [Binding], now: Date = Date()) {
        let grace = TimeInterval(limits.graceSeconds)
        state.withLockedValue { s in
            for b in saved where b.expires.addingTimeInterval(grace) > now {
                s.byName[b.name, default: [:]][b.address] = b.expires
                s.namesOf[b.address, default: []].insert(b.name)
            }
            s.version += 1
        }
    }
}
