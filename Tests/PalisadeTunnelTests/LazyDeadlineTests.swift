import NIOCore
import NIOEmbedded
@testable import PalisadeRelay
import XCTest

/// The L7 proxy's and the tunnel's timers: moving a deadline only stores
/// it, yet it fires once, at the time set last, and never after a clear.
final class LazyDeadlineTests: XCTestCase {
    final class Count { var n = 0 }

    func testFiresOnceAtTheDeadlineSetLast() {
        let loop = EmbeddedEventLoop()
        let fired = Count()
        let d = LazyDeadline(on: loop) { fired.n += 1 }
        d.arm(in: .seconds(10))
        loop.advanceTime(by: .seconds(6))
        d.arm(in: .seconds(10))   // moved later: due at 16 s now
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(fired.n, 0, "the first task fired early and re-armed")
        XCTAssertTrue(d.isArmed)
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(fired.n, 1)
        XCTAssertFalse(d.isArmed)
        loop.advanceTime(by: .seconds(60))
        XCTAssertEqual(fired.n, 1, "fires once per arming")
    }

    func testAnEarlierDeadlineIsNotDelayed() {
        let loop = EmbeddedEventLoop()
        let fired = Count()
        let d = LazyDeadline(on: loop) { fired.n += 1 }
        d.arm(in: .seconds(60))
        d.arm(in: .seconds(2))
        loop.advanceTime(by: .seconds(2))
        XCTAssertEqual(fired.n, 1)
    }

    func testClearAndStopDisarm() {
        let loop = EmbeddedEventLoop()
        let fired = Count()
        let d = LazyDeadline(on: loop) { fired.n += 1 }
        d.arm(in: .seconds(1))
        d.clear()
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(fired.n, 0, "cleared")
        d.arm(in: .seconds(1))
        loop.advanceTime(by: .seconds(1))
        XCTAssertEqual(fired.n, 1, "armed again after a clear")
        d.arm(in: .seconds(1))
        d.stop()
        d.arm(in: .seconds(1))
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(fired.n, 1, "stopped for good")
    }
}
