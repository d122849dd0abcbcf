import CPalisadeShared

/// The u32 security identity the datapath matches on.
public struct NumericIdentity: Hashable, Comparable, Codable, CustomStringConvertible, Sendable {
    public let rawValue: UInt32
    public init(_ raw: UInt32) { rawValue = raw }

    public static let any = NumericIdentity(UInt32(PAL_ID_ANY.rawValue))
    public static let host = NumericIdentity(UInt32(PAL_ID_HOST.rawValue))
    public static let world = NumericIdentity(UInt32(PAL_ID_WORLD.rawValue))
    public static let unknown = NumericIdentity(UInt32(PAL_ID_UNKNOWN.rawValue))
    public static let firstWorkload = UInt32(PAL_ID_FIRST_WORKLOAD.rawValue)
    public static let firstCIDR = UInt32(PAL_ID_FIRST_CIDR.rawValue)
    public static let firstFQDN = UInt32(PAL_ID_FIRST_FQDN.rawValue)

    public var isReserved: Bool { rawValue < NumericIdentity.firstWorkload }
    public var isCIDR: Bool { rawValue >= NumericIdentity.firstCIDR && rawValue < NumericIdentity.firstFQDN }
    /// An FQDN class: the set of toFQDNs selectors an address was learned for.
    public var isFQDN: Bool { rawValue >= NumericIdentity.firstFQDN }
    /// A workload identity (also the range of peer classes in policy keys).
    public var isWorkload: Bool { rawValue >= NumericIdentity.firstWorkload && rawValue < NumericIdentity.firstCIDR }

    /// Name of a reserved identity ("reserved:host"), nil for others.
    public var reservedName: String? {
        switch self {
        case .any: return "reserved:any"
        case .host: return "reserved:host"
        case .world: return "reserved:world"
        case .unknown: return "reserved:unknown"
        default: return nil
        }
    }

    public var description: String { String(rawValue) }
    public static func < (a: NumericIdentity, b: NumericIdentity) -> Bool { a.rawValue < b.rawValue }

    public init(from decoder: Decoder) throws { rawValue = try decoder.singleValueContainer().decode(UInt32.self) }
    public func encode(to encoder: Encoder) throws { var c = encoder.singleValueContainer(); try c.encode(rawValue) }
}

/// Hands out numeric identities for SPIFFE IDs, stable for as long as the
/// allocation table is kept (the agent persists it in its state directory;
/// the distributed store will allocate cluster-wide later).
public struct IdentityAllocator: Codable, Sendable {
    public private(set) var byID: [SpiffeID: NumericIdentity] = [:]
    private var next: UInt32 = NumericIdentity.firstWorkload

    public init() {}

    public mutating func identity(for id: SpiffeID) -> NumericIdentity {
        if let n = byID[id] { return n }
        while byID.values.contains(NumericIdentity(next)) { next += 1 }
        precondition(next < NumericIdentity.firstCIDR, "workload identity space exhausted")
        let n = NumericIdentity(next)
        next += 1
        byID[id] = n
        return n
    }

    /// Takes a number allocated elsewhere (cluster-wide, in the store); a
    /// different SPIFFE ID holding it locally loses it (and is renumbered
    /// the next time it is asked for).
    public mutating func assign(_ id: SpiffeID, _ n: NumericIdentity) {
        for (other, m) in byID where m == n && other != id { byID[other] = nil }
        byID[id] = n
    }

    /// Releases identities no longer used, so numbers can be reused later.
    public mutating func retain(only live: Set<SpiffeID>) {
        byID = byID.filter { live.contains($0.key) }
    }

    public func spiffeID(of n: NumericIdentity) -> SpiffeID? {
        byID.first { $0.value == n }?.key
    }
}
