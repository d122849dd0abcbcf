import NIOCore

extension SocketAddress {
    /// The IP address as 16 bytes (IPv4 as ::ffff:a.b.c.d, as the kernel
    /// maps key it); nil for a unix socket.
    package var addressBytes16: [UInt8]? {
        switch self {
        case .v4(let v4):
            var addr = v4.address.sin_addr
            return [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] + withUnsafeBytes(of: &addr) { Array($0) }
        case .v6(let v6):
            var addr = v6.address.sin6_addr
            return withUnsafeBytes(of: &addr) { Array($0) }
        default:
            return nil
        }
    }
}
