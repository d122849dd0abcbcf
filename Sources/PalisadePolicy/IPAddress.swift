/// An IPv4 or IPv6 address, held as 16 bytes (IPv4 as ::ffff:a.b.c.d, the
/// form the ipcache uses).
public struct IPAddress: Hashable, Comparable, Codable, CustomStringConvertible, Sendable {
    public var bytes: [UInt8]   // always 16

    public init(bytes16: [UInt8]) { precondition(bytes16.count == 16); bytes = bytes16 }

    public static func v4(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) -> IPAddress {
        IPAddress(bytes16: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
    }

    public var isV4: Bool { bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xff && bytes[11] == 0xff }

    public init?(_ text: String) {
        if text.contains(":") {
            guard let b = IPAddress.parseV6(text) else { return nil }
            bytes = b
        } else {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var b: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
            for p in parts {
                guard !p.isEmpty, p.count <= 3, p.allSatisfy(\.isASCII), let v = UInt8(p), !(p.count > 1 && p.first == "0") else { return nil }
                b.append(v)
            }
            bytes = b
        }
    }

    private static func parseV6(_ text: String) -> [UInt8]? {
        let halves = text.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ s: String) -> [UInt16]? {
            if s.isEmpty { return [] }
            var out: [UInt16] = []
            for g in s.split(separator: ":", omittingEmptySubsequences: false) {
                guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all: [UInt16]
        if halves.count == 2 {
            guard let tail = groups(halves[1]), head.count + tail.count < 8 else { return nil }
            all = head + Array(repeating: 0, count: 8 - head.count - tail.count) + tail
        } else {
            guard head.count == 8 else { return nil }
            all = head
        }
        return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] }
    }

    public var description: String {
        if isV4 { return bytes[12...].map(String.init).joined(separator: ".") }
        var groups: [UInt16] = stride(from: 0, to: 16, by: 2).map { UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]) }
        // Compress the longest run of zero groups (RFC 5952).
        var best = (start: -1, len: 0), i = 0
        while i < 8 {
            if groups[i] == 0 {
                var j = i
                while j < 8 && groups[j] == 0 { j += 1 }
                if j - i > best.len && j - i > 1 { best = (i, j - i) }
                i = j
            } else { i += 1 }
        }
        let hex = groups.map { String($0, radix: 16) }
        if best.start < 0 { return hex.joined(separator: ":") }
        groups.removeAll()
        let head = hex[0..<best.start].joined(separator: ":")
        let tail = hex[(best.start + best.len)...].joined(separator: ":")
        return head + "::" + tail
    }

    public static func < (a: IPAddress, b: IPAddress) -> Bool { a.bytes.lexicographicallyPrecedes(b.bytes) }

    public init(from decoder: Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        guard let a = IPAddress(s) else { throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not an IP address: \(s)")) }
        self = a
    }
    public func encode(to encoder: Encoder) throws { var c = encoder.singleValueContainer(); try c.encode(description) }
}

/// A prefix, stored in the 128-bit (IPv4-mapped) space the ipcache uses.
public struct CIDR: Hashable, Comparable, Codable, CustomStringConvertible, Sendable {
    public let address: IPAddress   // masked
    public let prefixLength: Int    // 0...128 in the mapped space

    public init(address: IPAddress, mappedPrefixLength: Int) {
        precondition((0...128).contains(mappedPrefixLength))
        var b = address.bytes
        for i in 0..<16 {
            let keep = max(0, min(8, mappedPrefixLength - i * 8))
            b[i] &= keep == 8 ? 0xff : UInt8(truncatingIfNeeded: 0xff << (8 - keep))
        }
        self.address = IPAddress(bytes16: b)
        prefixLength = mappedPrefixLength
    }

    /// "10.0.0.0/8", "fd00::/64", or a bare address (host prefix).
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let addr = IPAddress(String(parts[0])) else { return nil }
        let max = addr.isV4 ? 32 : 128
        var len = max
        if parts.count == 2 {
            guard let l = Int(parts[1]), (0...max).contains(l), parts[1].allSatisfy(\.isNumber) else { return nil }
            len = l
        }
        self.init(address: addr, mappedPrefixLength: addr.isV4 ? len + 96 : len)
        // Reject host bits set ("10.0.0.1/8"), as Kubernetes does for ipBlock.
        if self.address != addr && parts.count == 2 { return nil }
    }

    public var isV4: Bool { address.isV4 && prefixLength >= 96 }

    public func contains(_ a: IPAddress) -> Bool {
        CIDR(address: a, mappedPrefixLength: prefixLength).address == address
    }

    public func contains(_ other: CIDR) -> Bool {
        other.prefixLength >= prefixLength && contains(other.address)
    }

    public var description: String {
        isV4 ? "\(address)/\(prefixLength - 96)" : "\(address)/\(prefixLength)"
    }

    public static func < (a: CIDR, b: CIDR) -> Bool {
        a.address == b.address ? a.prefixLength < b.prefixLength : a.address < b.address
    }

    public init(from decoder: Decoder) throws {
        let s = try decoder.singleValueContainer().decode(String.self)
        guard let c = CIDR(s) else { throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a CIDR: \(s)")) }
        self = c
    }
    public func encode(to encoder: Encoder) throws { var c = encoder.singleValueContainer(); try c.encode(description) }
}
