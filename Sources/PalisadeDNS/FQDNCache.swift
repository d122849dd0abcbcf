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
        /// Addresses per toFQDNs selector, kept as names come and go (for
        /// the bound); recounted when the selectors in force change.
        var counted: [FQDNSelector] = []
        var perSelector: [FQDNSelector: Int] = [:]

        mutating func recount(_ selectors: [FQDNSelector]) {
            counted = selectors
            perSelector = [:]
            for names in namesOf.values {
                for sel in selectors where names.contains(where: { sel.matches($0) }) { perSelector[sel, default: 0] += 1 }
            }
        }

        /// Moves an address's counts from the selectors its old names
        /// matched to those its new names match.
        mutating func adjust(from old: Set<String>, to new: Set<String>) {
            for sel in counted {
                let was = old.contains { sel.matches($0) }, now = new.contains { sel.matches($0) }
                if was != now { perSelector[sel, default: 0] += now ? 1 : -1 }
            }
        }
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
            if s.counted != selectors { s.recount(selectors) }
            let matching = selectors.filter { sel in names.contains { sel.matches($0) } }
            for (a, ttl) in addresses {
                let ttl = TimeInterval(min(max(ttl, limits.minTTL), limits.maxTTL))
                let expires = now.addingTimeInterval(ttl)
                let before = s.namesOf[a] ?? []
                let after = before.union(names)
                // Every selector the address would newly join must have room.
                let joins = matching.filter { sel in !before.contains { sel.matches($0) } }
                if joins.contains(where: { s.perSelector[$0, default: 0] >= limits.maxAddressesPerSelector }) {
                    refused.append(a)
                    s.refused += 1
                    continue
                }
                for n in names {
                    let old = s.byName[n]?[a]
                    if old == nil || old! < expires { s.byName[n, default: [:]][a] = expires }
                }
                s.namesOf[a] = after
                s.retired[a] = nil
                if after != before {
                    s.adjust(from: before, to: after)
                    changed[a] = after
                }
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
                    let before = s.namesOf[a] ?? []
                    var after = before
                    after.remove(name)
                    s.namesOf[a] = after
                    s.adjust(from: before, to: after)
                    changed[a] = after
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

    /// The bindings of these addresses (what an answer just changed).
    public func bindings(of addresses: some Sequence<IPAddress>) -> [Binding] {
        state.withLockedValue { s in
            addresses.flatMap { a in (s.namesOf[a] ?? []).compactMap { n in s.byName[n]?[a].map { Binding(name: n, address: a, expires: $0) } } }
        }
    }

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
            s.counted = []   // recounted on the next answer
            s.version += 1
        }
    }
}
