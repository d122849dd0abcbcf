import XCTest
@testable import PalisadeDNS
import PalisadePolicy

/// DNS messages built byte by byte (RFC 1035 layout), read back through
/// libresolv; and the learned-name cache's TTL, grace, union and bounds.
final class DNSMessageTests: XCTestCase {
    static func name(_ n: String) -> [UInt8] {
        n.split(separator: ".").flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } + [0]
    }
    static func u16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
    static func u32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }

    /// A response to `question` with the given answer records (name, type, ttl, rdata).
    static func message(id: UInt16 = 0x1234, response: Bool, rcode: UInt8 = 0, question: String, qtype: UInt16 = 1,
                        answers: [(String, UInt16, UInt32, [UInt8])] = []) -> [UInt8] {
        var m = u16(id) + [response ? 0x81 : 0x01, response ? (0x80 | rcode) : 0] + u16(1) + u16(UInt16(answers.count)) + u16(0) + u16(0)
        m += name(question) + u16(qtype) + u16(1)
        for (n, t, ttl, rdata) in answers {
            m += name(n) + u16(t) + u16(1) + u32(ttl) + u16(UInt16(rdata.count)) + rdata
        }
        return m
    }

    func testQueryAndAnswerWithACNAMEChain() throws {
        let q = try DNSMessage(Self.message(response: false, question: "WWW.Shop.test"))
        XCTAssertFalse(q.isResponse)
        XCTAssertEqual(q.questionName, "www.shop.test")
        XCTAssertEqual(q.questionType, 1)
        let a = try DNSMessage(Self.message(response: true, question: "www.shop.test", answers: [
            ("www.shop.test", 5, 300, Self.name("edge.provider.net")),
            ("edge.provider.net", 5, 60, Self.name("edge2.provider.net")),
            ("edge2.provider.net", 1, 120, [203, 0, 113, 30]),
            ("edge2.provider.net", 28, 600, [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [0x10]),
            ("unrelated.org", 1, 600, [192, 0, 2, 1]),   // not on the chain: ignored
        ]))
        XCTAssertTrue(a.isResponse)
        XCTAssertEqual(a.id, 0x1234)
        let (names, addresses) = a.resolvedAddresses()
        XCTAssertEqual(names, ["www.shop.test", "edge.provider.net", "edge2.provider.net"])
        XCTAssertEqual(addresses.map(\.0), [IPAddress("203.0.113.30")!, IPAddress("2001:db8::10")!])
        XCTAssertEqual(addresses.map(\.1), [60, 60], "the smallest TTL along the chain")
    }

    func testACNAMELoopEnds() throws {
        let a = try DNSMessage(Self.message(response: true, question: "a.test", answers: [
            ("a.test", 5, 30, Self.name("b.test")), ("b.test", 5, 30, Self.name("a.test")),
        ]))
        XCTAssertEqual(a.resolvedAddresses().names, ["a.test", "b.test"])
        XCTAssertTrue(a.resolvedAddresses().addresses.isEmpty)
    }

    func testMalformedMessagesAreErrors() {
        let good = Self.message(response: true, question: "a.test", answers: [("a.test", 1, 30, [1, 2, 3, 4])])
        for cut in [0, 5, 12, 15, good.count - 1] {
            XCTAssertThrowsError(try DNSMessage(Array(good.prefix(cut))), "cut at \(cut)")
        }
        var twoQuestions = good
        twoQuestions[5] = 2
        XCTAssertThrowsError(try DNSMessage(twoQuestions))
        // A compression pointer to itself.
        var loop = Array(good.prefix(12)) + [0xc0, 12] + Self.u16(1) + Self.u16(1)
        loop[7] = 0
        XCTAssertThrowsError(try DNSMessage(loop))
    }

    func testRefusedReplyRepeatsTheQuestion() throws {
        let query = Self.message(id: 0xbeef, response: false, question: "evil.org", qtype: 28)
        let reply = try XCTUnwrap(DNSMessage.reply(to: query + [0, 0, 0], rcode: DNSMessage.rcodeRefused))   // trailing junk dropped
        let m = try DNSMessage(reply)
        XCTAssertTrue(m.isResponse)
        XCTAssertEqual(m.id, 0xbeef)
        XCTAssertEqual(m.rcode, DNSMessage.rcodeRefused)
        XCTAssertEqual(m.questionName, "evil.org")
        XCTAssertEqual(m.questionType, 28)
        XCTAssertTrue(m.answers.isEmpty)
        XCTAssertNil(DNSMessage.reply(to: [1, 2, 3], rcode: 5))
    }

    func testCacheTTLGraceUnionAndBound() {
        var limits = FQDNCache.Limits()
        limits.minTTL = 10
        limits.maxTTL = 100
        limits.graceSeconds = 5
        limits.maxAddressesPerSelector = 2
        let cache = FQDNCache(limits: limits)
        let t0 = Date(timeIntervalSince1970: 1_000_000)
        let api = FQDNSelector.name("api.example.com"), all = FQDNSelector.pattern("*.example.com")
        let a = IPAddress("203.0.113.10")!, b = IPAddress("203.0.113.11")!, c = IPAddress("203.0.113.12")!
        // TTL 1 is raised to the floor (10), 1000 cut to the cap (100).
        var r = cache.record(names: ["api.example.com"], addresses: [(a, 1)], selectors: [api, all], now: t0)
        XCTAssertEqual(r.changed, [a: ["api.example.com"]])
        r = cache.record(names: ["Other.Example.com."], addresses: [(a, 1000), (b, 1000)], selectors: [api, all], now: t0)
        XCTAssertEqual(r.changed, [a: ["api.example.com", "other.example.com"], b: ["other.example.com"]], "a shared address keeps both names")
        // *.example.com holds two addresses: a third is refused, not learned.
        r = cache.record(names: ["x.example.com"], addresses: [(c, 30)], selectors: [api, all], now: t0)
        XCTAssertEqual(r.refused, [c])
        XCTAssertEqual(cache.refused, 1)
        XCTAssertNil(cache.snapshot()[c])
        // Expiry: api's binding at t0+10, gone after grace (t0+15); a keeps other's.
        XCTAssertTrue(cache.expire(now: t0.addingTimeInterval(14)).isEmpty)
        XCTAssertEqual(cache.expire(now: t0.addingTimeInterval(15)), [a: ["other.example.com"]])
        XCTAssertEqual(cache.expire(now: t0.addingTimeInterval(105)), [a: [], b: []])
        XCTAssertTrue(cache.snapshot().isEmpty)
        XCTAssertEqual(cache.retiredAddresses(), [a, b], "expired addresses' open connections are left alone")
        // Saved and restored, past-grace bindings dropped.
        let again = FQDNCache(limits: limits)
        _ = again.record(names: ["api.example.com"], addresses: [(a, 50)], selectors: [api], now: t0)
        let restored = FQDNCache(limits: limits)
        restored.restore(again.bindings(), now: t0.addingTimeInterval(20))
        XCTAssertEqual(restored.snapshot(), [a: ["api.example.com"]])
        let late = FQDNCache(limits: limits)
        late.restore(again.bindings(), now: t0.addingTimeInterval(56))
        XCTAssertTrue(late.snapshot().isEmpty)
    }
}
