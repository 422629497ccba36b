"""Group policy (issue 12): the compiled model of the policy (`compiled`, pure), one
backend per kind of bridge (`nft` for Linux bridges, `openflow` for Open vSwitch) behind
one interface (`base`), and the controller that feeds them (`controller`)."""
